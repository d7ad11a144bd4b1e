#!/usr/bin/env node
// An API in Node.js checking a token-broker bound step token and its DPoP proof (RFC 9449
// §4.3) with `jose` alone: the token against the broker's JWKS (issuer, audience, typ
// at+jwt), the proof against the key in its own header (typ dpop+jwt, asymmetric alg, iat
// within 60 s), its htm/htu against the request, its ath against the token, and the RFC 7638
// thumbprint of its key against the token's cnf.jkt. (Replay of the proof's jti is left to
// the caller's store.)
//
// Reads one JSON object on stdin: {token, proof, jwks, issuer, audience, method, url}.
// Prints {"ok": true, "jkt": ..., "run_id": ...} or {"ok": false, "error": "<which check>"}.

import { createHash } from "node:crypto";
import { stdin } from "node:process";

import { EmbeddedJWK, calculateJwkThumbprint, createLocalJWKSet, jwtVerify } from "jose";

const PROOF_ALGORITHMS = ["ES256", "EdDSA", "RS256"];

function withoutQuery(url) {
  return url.split("#")[0].split("?")[0];
}

async function check({ token, proof, jwks, issuer, audience, method, url }) {
  const { payload: claims } = await jwtVerify(token, createLocalJWKSet(jwks), {
    issuer,
    audience,
    typ: "at+jwt",
  });
  const jkt = claims.cnf?.jkt;
  if (!jkt) return { ok: false, error: "token not bound (no cnf.jkt)" };
  let verified;
  try {
    verified = await jwtVerify(proof, EmbeddedJWK, {
      typ: "dpop+jwt",
      algorithms: PROOF_ALGORITHMS,
      maxTokenAge: "60s",
      requiredClaims: ["jti", "htm", "htu", "iat"],
    });
  } catch (error) {
    return { ok: false, error: `proof: ${error.code ?? error.message}` };
  }
  const { payload, protectedHeader } = verified;
  if (payload.htm !== method) return { ok: false, error: "htm" };
  if (withoutQuery(payload.htu) !== withoutQuery(url)) return { ok: false, error: "htu" };
  const ath = createHash("sha256").update(token, "ascii").digest("base64url");
  if (payload.ath !== ath) return { ok: false, error: "ath" };
  if ((await calculateJwkThumbprint(protectedHeader.jwk, "sha256")) !== jkt) {
    return { ok: false, error: "jkt" };
  }
  return { ok: true, jkt, run_id: claims.run_id };
}

let input = "";
for await (const chunk of stdin) input += chunk;
try {
  console.log(JSON.stringify(await check(JSON.parse(input))));
} catch (error) {
  console.log(JSON.stringify({ ok: false, error: error.code ?? error.message }));
}
