#!/usr/bin/env node
// A token-broker delegate in Node.js: a portal's service account starts a run on behalf of a
// person (ExecuteOnBehalfOf, role delegator), the run's credential mints a step token
// (IssueToken), and the token is verified as any API would, against the broker's HTTP JWKS
// with `jose` (createRemoteJWKSet + jwtVerify: signature, issuer, audience, type).
//
// It loads protos/tokenbroker/v1/*.proto as they are, with @grpc/proto-loader: no generated
// code. Prints one JSON object with what happened; exits 1 with a message on failure.
//
//   node delegate.mjs --target 127.0.0.1:50051 --http http://127.0.0.1:8080 \
//     --account deploy-portal --key deploy-portal.pem --kid portal-1 \
//     --pipeline acme/payments/deploy --email alice@example.com --audience https://api.example.com

import { randomUUID } from "node:crypto";
import { readFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";

import * as grpc from "@grpc/grpc-js";
import * as protoLoader from "@grpc/proto-loader";
import { SignJWT, createRemoteJWKSet, importPKCS8, jwtVerify } from "jose";

const HERE = dirname(fileURLToPath(import.meta.url));
const PROTOS = join(HERE, "..", "..", "protos");
const CALL_TIMEOUT_MS = 10_000;
// The broker refuses service-account assertions that live longer than 5 minutes.
const ASSERTION_LIFETIME_S = 120;

const OPTIONS = {
  target: { type: "string", default: process.env.TOKEN_BROKER_TARGET ?? "127.0.0.1:50051" },
  http: { type: "string" }, // the broker's HTTP port, e.g. http://127.0.0.1:8080
  account: { type: "string" }, // the delegator service account
  key: { type: "string" }, // its private key, PKCS#8 PEM (EC P-256)
  kid: { type: "string", default: "" },
  "ca-file": { type: "string" }, // TLS to a non-loopback target: the CA to trust
  pipeline: { type: "string", default: "acme/payments/deploy" },
  subject: { type: "string" }, // the person, as the delegator asserts them...
  email: { type: "string" },
  "id-token": { type: "string" }, // ...or their ID token from an identity provider
  audience: { type: "string", default: "https://api.example.com" },
  permissions: { type: "string", default: "artifacts=read" },
  "keep-run": { type: "boolean", default: false }, // default: end the run when done
};

function fail(message) {
  process.stderr.write(`delegate: ${message}\n`);
  process.exit(1);
}

function required(values, name) {
  if (!values[name]) fail(`--${name} is required`);
  return values[name];
}

function isLoopback(target) {
  const host = target.startsWith("[") ? target.slice(1, target.indexOf("]")) : target.split(":")[0];
  return host === "localhost" || host === "::1" || host.startsWith("127.");
}

function loadBroker() {
  const definition = protoLoader.loadSync(join(PROTOS, "tokenbroker", "v1", "broker.proto"), {
    includeDirs: [PROTOS],
    keepCase: true, // field names as in the .proto: run_id, permission_ceiling
    longs: String,
    enums: String,
    defaults: true,
    oneofs: true,
  });
  return grpc.loadPackageDefinition(definition).tokenbroker.v1.TokenBrokerService;
}

// A promise for a unary call, with the bearer credential as metadata. (gRPC call credentials
// would refuse a plaintext channel; metadata is what the broker reads either way.)
function call(client, method, request, bearer) {
  const metadata = new grpc.Metadata();
  metadata.set("authorization", `Bearer ${bearer}`);
  const deadline = new Date(Date.now() + CALL_TIMEOUT_MS);
  return new Promise((resolve, reject) => {
    client[method](request, metadata, { deadline }, (error, response) => {
      if (error) reject(new Error(`${method}: ${grpc.status[error.code]}: ${error.details}`));
      else resolve(response);
    });
  });
}

// The service account's assertion (RFC 7523 style): iss = sub = the account, aud = the
// broker's issuer, short-lived, signed with the account's key (the policy holds its public key).
async function assertion(account, keyPem, kid, issuer) {
  const key = await importPKCS8(keyPem, "ES256");
  return new SignJWT({})
    .setProtectedHeader({ alg: "ES256", typ: "JWT", ...(kid ? { kid } : {}) })
    .setIssuer(account)
    .setSubject(account)
    .setAudience(issuer)
    .setIssuedAt()
    .setExpirationTime(`${ASSERTION_LIFETIME_S}s`)
    .setJti(randomUUID())
    .sign(key);
}

function parsePermissions(text) {
  return text.split(",").map((pair) => {
    const [resource, level] = pair.split("=");
    return { resource, level };
  });
}

function person(values) {
  if (values["id-token"]) return { id_token: values["id-token"] };
  return { asserted: { subject: required(values, "subject"), email: values.email ?? "" } };
}

async function discover(httpBase) {
  const response = await fetch(new URL("/.well-known/openid-configuration", httpBase));
  if (!response.ok) fail(`discovery document: HTTP ${response.status}`);
  return response.json();
}

async function main() {
  const { values } = parseArgs({ options: OPTIONS, strict: true });
  const httpBase = required(values, "http");
  const account = required(values, "account");
  const keyPem = readFileSync(required(values, "key"), "utf8");
  const [org, project, pipeline] = values.pipeline.split("/");

  // The issuer (the `aud` of our assertions, the `iss` of broker tokens) from discovery; the
  // keys from this HTTP address (the issuer URL may name a load balancer instead).
  const { issuer } = await discover(httpBase);
  const jwks = createRemoteJWKSet(new URL("/.well-known/jwks.json", httpBase));

  const TokenBrokerService = loadBroker();
  const channel = isLoopback(values.target)
    ? grpc.credentials.createInsecure()
    : grpc.credentials.createSsl(values["ca-file"] ? readFileSync(values["ca-file"]) : null);
  const broker = new TokenBrokerService(values.target, channel);
  try {
    const portal = await assertion(account, keyPem, values.kid, issuer);
    const executed = await call(
      broker,
      "ExecuteOnBehalfOf",
      {
        pipeline: { org, project, pipeline },
        permission_ceiling: parsePermissions(values.permissions),
        idempotency_key: randomUUID(),
        ...person(values),
      },
      portal,
    );
    const run = executed.run;

    // A pipeline step: the run credential is all it holds.
    const issued = await call(
      broker,
      "IssueToken",
      {
        run_id: run.run_id,
        audience: values.audience,
        permissions: parsePermissions(values.permissions),
        step: "node-delegate",
      },
      executed.run_credential,
    );

    // An API: offline verification against the published keys.
    const { payload, protectedHeader } = await jwtVerify(issued.token, jwks, {
      issuer,
      audience: values.audience,
      typ: "at+jwt",
      algorithms: ["ES256", "EdDSA", "RS256"],
    });

    let ended = false;
    if (!values["keep-run"]) {
      await call(
        broker,
        "RevokeRun",
        { run_id: run.run_id, reason: "node delegate done" },
        executed.run_credential,
      );
      ended = true;
    }
    process.stdout.write(
      `${JSON.stringify({
        run_id: run.run_id,
        attribution: run.attribution?.summary ?? "",
        token_id: issued.token_id,
        verified: {
          kid: protectedHeader.kid,
          iss: payload.iss,
          aud: payload.aud,
          run_id: payload.run_id,
          on_behalf_of: payload.on_behalf_of,
          act: payload.act,
          permissions: payload.permissions,
        },
        ended,
      })}\n`,
    );
  } finally {
    broker.close();
  }
}

main().catch((error) => fail(error.message));
