-- smtp.inbox.page: the web inbox's single page (HTML, CSS and script in one string, no build step,
-- nothing fetched from elsewhere). It reads the JSON API, follows /api/v1/events for new mail and
-- shows a message's HTML in a sandboxed frame without scripts, remote images loaded only on request.
local M = {}

M.html = [==[<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>lua-smtp inbox</title>
<style>
:root { --fg:#1d232a; --mute:#5b6673; --line:#d6dbe1; --sel:#e4eefc; --acc:#1a5fb4; --bg:#fff; }
* { box-sizing: border-box; }
body { margin:0; font:14px/1.4 system-ui, sans-serif; color:var(--fg); background:var(--bg); height:100vh; display:flex; flex-direction:column; }
header { display:flex; gap:.5rem; align-items:center; padding:.5rem .75rem; border-bottom:1px solid var(--line); background:#f5f7f9; }
header h1 { font-size:1rem; margin:0 .75rem 0 0; }
header input { flex:1; padding:.35rem .5rem; font:inherit; border:1px solid var(--line); border-radius:4px; }
button, .btn { font:inherit; padding:.3rem .7rem; border:1px solid var(--line); border-radius:4px; background:#fff; color:var(--fg); cursor:pointer; text-decoration:none; display:inline-block; }
button:hover, .btn:hover { background:#eef2f6; }
:focus-visible { outline:3px solid var(--acc); outline-offset:1px; }
main { flex:1; display:flex; min-height:0; }
#list { width:38%; min-width:18rem; border-right:1px solid var(--line); overflow:auto; margin:0; padding:0; list-style:none; }
#list li { padding:.5rem .75rem; border-bottom:1px solid var(--line); cursor:pointer; }
#list li[aria-selected="true"] { background:var(--sel); }
#list .from { font-weight:600; } #list .date { float:right; color:var(--mute); font-size:.85em; }
#list .subj { white-space:nowrap; overflow:hidden; text-overflow:ellipsis; }
#list .snip { color:var(--mute); font-size:.9em; white-space:nowrap; overflow:hidden; text-overflow:ellipsis; }
#list .att { color:var(--mute); font-size:.85em; }
#count { color:var(--mute); font-size:.9em; }
#view { flex:1; display:flex; flex-direction:column; min-width:0; }
#message { flex:1; display:flex; flex-direction:column; min-height:0; }
#meta { padding:.75rem; border-bottom:1px solid var(--line); }
#meta h2 { margin:0 0 .4rem; font-size:1.15rem; }
#meta dl { margin:0; display:grid; grid-template-columns:auto 1fr; gap:.1rem .6rem; }
#meta dt { color:var(--mute); } #meta dd { margin:0; }
#tabs { display:flex; gap:.25rem; padding:.4rem .75rem; border-bottom:1px solid var(--line); flex-wrap:wrap; align-items:center; }
#tabs [role=tab][aria-selected="true"] { background:var(--acc); color:#fff; border-color:var(--acc); }
#tabs .spacer { flex:1; }
#panel { flex:1; overflow:auto; min-height:0; }
#panel iframe { width:100%; height:100%; border:0; background:#fff; }
#panel pre { margin:0; padding:.75rem; white-space:pre-wrap; word-break:break-word; font:13px/1.4 ui-monospace, monospace; }
#panel table { border-collapse:collapse; margin:.75rem; } #panel td, #panel th { border:1px solid var(--line); padding:.25rem .5rem; text-align:left; vertical-align:top; }
#panel ul.tree { font:13px ui-monospace, monospace; }
#atts { padding:.4rem .75rem; display:flex; gap:.4rem; flex-wrap:wrap; border-bottom:1px solid var(--line); }
#atts:empty { display:none; }
#empty { margin:auto; color:var(--mute); text-align:center; }
#remote-note { padding:.35rem .75rem; background:#fff8e1; border-bottom:1px solid var(--line); display:flex; gap:.6rem; align-items:center; }
.hidden { display:none !important; }
kbd { border:1px solid var(--line); border-radius:3px; padding:0 .25rem; font-size:.85em; background:#f5f7f9; }
#help { color:var(--mute); font-size:.85em; }
</style>
</head>
<body>
<header>
  <h1>lua-smtp inbox</h1>
  <label for="search" class="hidden">Search</label>
  <input id="search" type="search" placeholder="Search: from:ann to:bob subject:&quot;hello there&quot; words  ( / )" aria-label="Search by sender, recipient and subject" autocomplete="off">
  <span id="count" aria-live="polite"></span>
  <button id="delete-all" type="button" title="Delete every message">Delete all</button>
</header>
<main>
  <ul id="list" role="listbox" tabindex="0" aria-label="Messages, newest first"></ul>
  <section id="view" aria-label="Message">
    <div id="empty"><p>No message selected.</p>
      <p id="help"><kbd>j</kbd>/<kbd>k</kbd> or arrows: move &middot; <kbd>Enter</kbd>: open &middot; <kbd>/</kbd>: search &middot;
      <kbd>1</kbd>&ndash;<kbd>5</kbd>: HTML, text, headers, source, MIME &middot; <kbd>Delete</kbd>: delete &middot; <kbd>Esc</kbd>: back to the list</p></div>
    <div id="message" class="hidden">
      <div id="meta"><h2 id="m-subject"></h2><dl id="m-dl"></dl></div>
      <div id="tabs" role="tablist" aria-label="Views">
        <button role="tab" id="tab-html" data-tab="html" type="button">HTML</button>
        <button role="tab" id="tab-text" data-tab="text" type="button">Text</button>
        <button role="tab" id="tab-headers" data-tab="headers" type="button">Headers</button>
        <button role="tab" id="tab-raw" data-tab="raw" type="button">Source</button>
        <button role="tab" id="tab-mime" data-tab="mime" type="button">MIME</button>
        <span class="spacer"></span>
        <a class="btn" id="download-raw" href="#" download>Download .eml</a>
        <button id="delete-one" type="button">Delete</button>
      </div>
      <div id="atts" aria-label="Attachments"></div>
      <div id="remote-note" class="hidden"><span>Remote content is blocked.</span><button id="load-remote" type="button">Load remote images</button></div>
      <div id="panel" role="tabpanel"></div>
    </div>
  </section>
</main>
<script>
"use strict";
const $ = (s) => document.querySelector(s);
let items = [], sel = -1, current = null, tab = "html", remote = false, query = "";
const esc = (s) => String(s == null ? "" : s).replace(/[&<>"']/g, c => ({"&":"&amp;","<":"&lt;",">":"&gt;",'"':"&quot;","'":"&#39;"}[c]));
const addr = (a) => a ? (a.Name ? a.Name + " <" + a.Address + ">" : a.Address) : "";
const when = (d) => { const t = new Date(d); return isNaN(t) ? d : t.toLocaleString(); };
async function api(path, opts) { const r = await fetch("/api/v1/" + path, opts); if (!r.ok) throw new Error(r.status + " " + await r.text()); return r; }

async function load() {
  const r = await api(query ? "search?limit=500&query=" + encodeURIComponent(query) : "messages?limit=500");
  const j = await r.json();
  items = j.messages;
  $("#count").textContent = j.messages_count + (query ? " found" : " messages");
  render();
}
function render() {
  const ul = $("#list");
  ul.innerHTML = "";
  items.forEach((m, i) => {
    const li = document.createElement("li");
    li.id = "msg-" + m.ID; li.setAttribute("role", "option"); li.dataset.id = m.ID;
    li.setAttribute("aria-selected", current && current.ID === m.ID ? "true" : "false");
    li.innerHTML = '<span class="date">' + esc(when(m.Created)) + '</span><div class="from">' + esc(addr(m.From)) +
      '</div><div class="subj">' + esc(m.Subject || "(no subject)") + (m.Attachments ? ' <span class="att">· ' + m.Attachments + (m.Attachments > 1 ? " attachments" : " attachment") + "</span>" : "") + '</div><div class="snip">' + esc(m.Snippet) + '</div>';
    li.addEventListener("click", () => { sel = i; open(m.ID); });
    ul.appendChild(li);
  });
  if (current) sel = items.findIndex(m => m.ID === current.ID);
  mark();
}
function mark() {
  [...$("#list").children].forEach((li, i) => li.setAttribute("aria-selected", i === sel ? "true" : "false"));
  const li = $("#list").children[sel];
  if (li) { li.scrollIntoView({block: "nearest"}); $("#list").setAttribute("aria-activedescendant", li.id); }
}
async function open(id) {
  const r = await api("message/" + id);
  current = await r.json(); remote = false;
  $("#empty").classList.add("hidden"); $("#message").classList.remove("hidden");
  $("#m-subject").textContent = current.Subject || "(no subject)";
  const rows = [["From", addr(current.From)], ["To", current.To.map(addr).join(", ")], ["Cc", current.Cc.map(addr).join(", ")],
    ["Bcc", current.Bcc.map(addr).join(", ")], ["Date", when(current.Date)], ["Size", current.Size + " bytes"]];
  $("#m-dl").innerHTML = rows.filter(r => r[1]).map(r => "<dt>" + r[0] + "</dt><dd>" + esc(r[1]) + "</dd>").join("");
  $("#download-raw").href = "/api/v1/message/" + id + "/raw"; $("#download-raw").setAttribute("download", id + ".eml");
  $("#atts").innerHTML = current.Attachments.map(a => '<a class="btn attachment" href="/api/v1/message/' + id + "/part/" + esc(a.PartID) +
    '" download="' + esc(a.FileName || "part-" + a.PartID) + '">⬇ ' + esc(a.FileName || a.ContentType) + " (" + a.Size + " bytes)</a>").join("");
  mark();
  show(current.HTML ? "html" : "text");
}
async function show(t) {
  if (!current) return;
  tab = t;
  document.querySelectorAll("[role=tab]").forEach(b => b.setAttribute("aria-selected", b.dataset.tab === t ? "true" : "false"));
  const p = $("#panel"), id = current.ID;
  $("#remote-note").classList.toggle("hidden", !(t === "html" && current.HTML && !remote));
  if (t === "html") {
    // no allow-scripts, no allow-same-origin: the mail's scripts never run and it cannot reach this page
    p.innerHTML = current.HTML ? '<iframe id="html-frame" title="Message HTML" sandbox="allow-popups allow-popups-to-escape-sandbox" referrerpolicy="no-referrer" src="/view/' + id + '.html' + (remote ? "?remote=1" : "") + '"></iframe>'
      : "<pre>(no HTML part)</pre>";
  } else if (t === "text") {
    p.innerHTML = "<pre id=\"text-view\">" + esc(current.Text || "(no text part)") + "</pre>";
  } else if (t === "headers") {
    const h = await (await api("message/" + id + "/headers")).json();
    p.innerHTML = "<table><tbody>" + Object.keys(h).map(k => h[k].map(v => "<tr><th>" + esc(k) + "</th><td>" + esc(v) + "</td></tr>").join("")).join("") + "</tbody></table>";
  } else if (t === "raw") {
    p.innerHTML = "<pre>" + esc(await (await api("message/" + id + "/raw")).text()) + "</pre>";
  } else if (t === "mime") {
    const tree = (n) => "<li>" + esc(n.PartID + " " + n.ContentType + (n.FileName ? " “" + n.FileName + "”" : "") + (n.Parts.length ? "" : " (" + n.Size + " bytes)")) +
      (n.Parts.length === 0 && n.Size > 0 && n.PartID !== "1" ? ' <a href="/api/v1/message/' + id + "/part/" + esc(n.PartID) + '" download>download</a>' : "") +
      (n.Parts.length ? "<ul>" + n.Parts.map(tree).join("") + "</ul>" : "") + "</li>";
    p.innerHTML = '<ul class="tree">' + tree(current.Tree) + "</ul>" + (current.Defects.length ? "<p>Defects:</p><ul>" + current.Defects.map(d => "<li>" + esc(d) + "</li>").join("") + "</ul>" : "");
  }
}
async function del(ids) {
  await api("messages", {method: "DELETE", headers: {"content-type": "application/json"}, body: JSON.stringify(ids ? {IDs: ids} : {})});
}
function closeMessage() { current = null; $("#message").classList.add("hidden"); $("#empty").classList.remove("hidden"); $("#list").focus(); }
async function deleteCurrent() {
  if (!current) return;
  const i = sel; await del([current.ID]); closeMessage(); await load();
  sel = Math.min(i, items.length - 1); mark();
}
$("#delete-one").addEventListener("click", deleteCurrent);
$("#delete-all").addEventListener("click", async () => { if (confirm("Delete every message?")) { await del(null); closeMessage(); await load(); } });
$("#load-remote").addEventListener("click", () => { remote = true; show("html"); });
document.querySelectorAll("[role=tab]").forEach(b => b.addEventListener("click", () => show(b.dataset.tab)));
let timer; $("#search").addEventListener("input", e => { clearTimeout(timer); timer = setTimeout(() => { query = e.target.value.trim(); load(); }, 200); });
document.addEventListener("keydown", (e) => {
  const typing = e.target.tagName === "INPUT";
  if (e.key === "Escape") { if (typing) { e.target.blur(); $("#list").focus(); } else closeMessage(); return; }
  if (typing || e.ctrlKey || e.metaKey || e.altKey) return;
  if (e.key === "/") { e.preventDefault(); $("#search").focus(); }
  else if (e.key === "j" || e.key === "ArrowDown") { e.preventDefault(); sel = Math.min(sel + 1, items.length - 1); mark(); }
  else if (e.key === "k" || e.key === "ArrowUp") { e.preventDefault(); sel = Math.max(sel - 1, 0); mark(); }
  else if (e.key === "Enter" && e.target.tagName !== "BUTTON" && e.target.tagName !== "A" && items[sel]) { open(items[sel].ID); }
  else if ((e.key === "Delete" || e.key === "d") && current) { deleteCurrent(); }
  else if ("12345".includes(e.key) && current) { show(["html", "text", "headers", "raw", "mime"][+e.key - 1]); }
});
const es = new EventSource("/api/v1/events");
// a burst of mail reloads the list once
let pending = null;
const later = () => { if (!pending) pending = setTimeout(() => { pending = null; load(); }, 150); };
es.addEventListener("new", later);
es.addEventListener("delete", later);
load();
</script>
</body>
</html>
]==]

return M
