"""The audit console's one page: HTML, CSS and the script that checks every proof itself.

The script trusts nothing the console says about validity: it verifies the checkpoint's
Ed25519 signature with the log's verifier key and each event's inclusion proof (RFC 9162
§2.1.3.2) with WebCrypto, and shows the mark only when all of them hold. All data is put in
the page as text (textContent), never as HTML.
"""

PAGE = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>token-broker · audit console</title>
<style>
  body { font: 14px/1.45 system-ui, sans-serif; margin: 1.5rem 2rem; color: #1d2330; }
  h1 { font-size: 1.3rem; margin: 0 0 1rem; }
  form { display: flex; flex-wrap: wrap; gap: .5rem; align-items: end; margin-bottom: 1rem; }
  label { display: flex; flex-direction: column; font-size: .8rem; color: #556; }
  input { font: inherit; padding: .25rem .4rem; border: 1px solid #bbc; border-radius: 4px; }
  button { font: inherit; padding: .35rem .9rem; border-radius: 4px; border: 0;
           background: #2f5bd3; color: white; cursor: pointer; }
  table { border-collapse: collapse; margin: .5rem 0 1.2rem; width: 100%; }
  th, td { text-align: left; padding: .25rem .6rem; border-bottom: 1px solid #e3e5ea;
           vertical-align: top; }
  th { font-size: .78rem; color: #556; font-weight: 600; }
  a { color: #2f5bd3; cursor: pointer; }
  .summary { font-size: 1.05rem; margin: .4rem 0 .8rem; }
  .mark { display: inline-block; padding: .35rem .8rem; border-radius: 6px; font-weight: 600; }
  .ok { background: #e3f6e8; color: #17692f; }
  .bad { background: #fde8e8; color: #a01b1b; }
  .muted { color: #778; font-size: .85rem; }
</style>
</head>
<body>
<h1>Audit console <span class="muted">read-only · your own auditor credentials</span></h1>
<form id="find">
  <label>Person <input name="person" placeholder="alice@example.com"></label>
  <label>Org <input name="org" placeholder="acme"></label>
  <label>Project <input name="project"></label>
  <label>Pipeline <input name="pipeline"></label>
  <label>From <input name="from" type="date"></label>
  <label>To <input name="to" type="date"></label>
  <button>Find runs</button>
</form>
<div id="runs"></div>
<div id="run"></div>
<script>
"use strict";
const enc = new TextEncoder();
const b64 = (s) => Uint8Array.from(atob(s), (c) => c.charCodeAt(0));
const eq = (a, b) => a.length === b.length && a.every((x, i) => x === b[i]);
const hexBytes = (h) => Uint8Array.from(h.match(/../g) || [], (x) => parseInt(x, 16));

async function sha256(...parts) {
  const all = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) { all.set(p, at); at += p.length; }
  return new Uint8Array(await crypto.subtle.digest("SHA-256", all));
}

// The checkpoint (a C2SP signed note) must carry a valid Ed25519 signature by the log key.
async function verifyCheckpoint(note, vkey) {
  const parts = vkey.trim().split("+");
  const name = parts[0], keyId = hexBytes(parts[1] || ""), raw = b64(parts.slice(2).join("+"));
  if (raw.length !== 33 || raw[0] !== 1) throw new Error("not an Ed25519 note verifier key");
  const id = (await sha256(enc.encode(name + "\n"), raw)).slice(0, 4);
  if (!eq(id, keyId)) throw new Error("the verifier key's id does not match its key");
  const cut = note.indexOf("\n\n");
  if (cut < 0) throw new Error("not a signed note");
  const text = note.slice(0, cut + 1);
  const key = await crypto.subtle.importKey("raw", raw.slice(1), { name: "Ed25519" }, false,
                                            ["verify"]);
  for (const line of note.slice(cut + 2).split("\n").filter(Boolean)) {
    const rest = line.replace(/^\u2014 /, "");
    const space = rest.indexOf(" ");
    const sig = b64(rest.slice(space + 1));
    if (rest.slice(0, space) !== name || !eq(sig.slice(0, 4), keyId)) continue;
    const ok = await crypto.subtle.verify({ name: "Ed25519" }, key, sig.slice(4),
                                          enc.encode(text));
    if (!ok) throw new Error("the tree head's signature does not verify");
    const [origin, size, root] = text.split("\n");
    if (origin !== name) throw new Error("the tree head is for another log");
    return { origin, size: Number(size), root: b64(root) };
  }
  throw new Error("no signature by the log key on the tree head");
}

// RFC 9162 section 2.1.3.2: walk the audit path from the leaf to the root.
async function verifyInclusion(record, index, size, proof, root) {
  let fn = index, sn = size - 1;
  if (fn > sn) return false;
  let r = await sha256(new Uint8Array([0]), enc.encode(record));
  for (const p of proof.map(b64)) {
    if (sn === 0) return false;
    if (fn % 2 === 1 || fn === sn) {
      r = await sha256(new Uint8Array([1]), p, r);
      while (fn % 2 === 0 && fn !== 0) { fn = Math.floor(fn / 2); sn = Math.floor(sn / 2); }
    } else {
      r = await sha256(new Uint8Array([1]), r, p);
    }
    fn = Math.floor(fn / 2); sn = Math.floor(sn / 2);
  }
  return sn === 0 && eq(r, root);
}

function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text !== undefined) node.textContent = text;
  if (cls) node.className = cls;
  return node;
}

function table(headers, rows) {
  const t = el("table"), head = el("tr");
  headers.forEach((h) => head.appendChild(el("th", h)));
  t.appendChild(head);
  rows.forEach((cells) => {
    const tr = el("tr");
    cells.forEach((c) => tr.appendChild(c instanceof Node ? c : el("td", String(c))));
    t.appendChild(tr);
  });
  return t;
}

async function getJson(url) {
  const response = await fetch(url);
  const body = await response.json();
  if (!response.ok) throw new Error(body.error || response.statusText);
  return body;
}

async function findRuns(form) {
  const query = new URLSearchParams(new FormData(form)).toString();
  const box = document.getElementById("runs");
  box.replaceChildren(el("p", "searching…", "muted"));
  try {
    const { runs } = await getJson("/api/runs?" + query);
    const rows = runs.map((r) => {
      const link = el("td"); const a = el("a", r.run_id);
      a.onclick = () => { location.hash = "run=" + r.run_id; };
      link.appendChild(a);
      return [link, r.pipeline, r.state, r.summary, r.created];
    });
    box.replaceChildren(el("p", runs.length + " runs", "muted"),
                        table(["run", "pipeline", "state", "who", "started"], rows));
  } catch (error) {
    box.replaceChildren(el("p", "could not search: " + error.message, "bad"));
  }
}

async function showRun(id) {
  const box = document.getElementById("run");
  box.replaceChildren(el("p", "loading " + id + "…", "muted"));
  let data;
  try {
    data = await getJson("/api/run?id=" + encodeURIComponent(id));
  } catch (error) {
    box.replaceChildren(el("p", "could not load the run: " + error.message, "bad"));
    return;
  }
  const r = data.run;
  const mark = el("span", "checking…", "mark");
  const marks = [];
  box.replaceChildren(
    el("h2", "Run " + r.run_id + " · " + r.pipeline + " · " + r.state),
    el("div", r.summary, "summary"),
    mark,
    el("h3", "Tokens"),
    table(["token", "audience", "permissions", "step", "died", "why"],
          data.tokens.map((t) => [t.token_id, t.audience, t.permissions, t.step, t.died,
                                  t.died_because])),
    el("h3", "Events"),
    table(["seq", "time", "action", "by", "in the log"],
          data.events.map((e) => {
            const cell = el("td", "…"); marks.push(cell);
            return [e.sequence, e.time, e.action, e.principal, cell];
          })),
    el("p", (data.key_pinned ? "log key pinned by the console: " :
             "log key as the broker names it (pin it with --log-key): ") + data.log_key,
       "muted"),
  );
  try {
    const head = await verifyCheckpoint(data.checkpoint, data.log_key);
    let all = true;
    for (let i = 0; i < data.events.length; i++) {
      const e = data.events[i];
      const ok = await verifyInclusion(e.record, e.leaf_index, head.size, e.proof, head.root);
      marks[i].textContent = ok ? "✓ leaf " + e.leaf_index : "✗ proof fails";
      all = all && ok && JSON.parse(e.record).sequence === e.sequence;
    }
    if (!all) throw new Error("an event's inclusion proof does not verify");
    mark.textContent = "✓ Verified in your browser: " + data.events.length +
      " events are in the log " + head.origin + " of " + head.size + " events (signed head)";
    mark.classList.add("ok");
    document.body.dataset.verified = "yes";
  } catch (error) {
    mark.textContent = "✗ NOT verified: " + error.message;
    mark.classList.add("bad");
    document.body.dataset.verified = "no";
  }
}

document.getElementById("find").onsubmit = (event) => {
  event.preventDefault();
  findRuns(event.target);
};
function route() {
  const m = location.hash.match(/^#run=(.+)$/);
  if (m) showRun(decodeURIComponent(m[1]));
}
window.onhashchange = route;
route();
</script>
</body>
</html>
"""
