// surepoint console: live session logs and confirmations. Plain JavaScript, no build step.
"use strict";

const ACTIVE = ["queued", "starting", "running"];

function followSession(box) {
  const id = box.dataset.session;
  const log = document.getElementById("log");
  const stateEl = document.getElementById("state");
  let last = Number(log.dataset.last || 0);
  async function poll() {
    let data;
    try {
      const response = await fetch(`/api/v1/sessions/${id}/log?after=${last}`, { credentials: "same-origin" });
      if (!response.ok) throw new Error(String(response.status));
      data = await response.json();
    } catch (e) {
      setTimeout(poll, 3000);
      return;
    }
    for (const entry of data.lines) {
      // textContent: log lines come from backups of guests and are never interpreted as HTML
      log.appendChild(document.createTextNode(`${entry.time.slice(0, 19).replace("T", " ")} ${entry.line}\n`));
      last = entry.id;
    }
    if (data.lines.length) log.scrollTop = log.scrollHeight;
    stateEl.textContent = data.state;
    stateEl.className = `state ${data.state}`;
    if (ACTIVE.includes(data.state)) {
      setTimeout(poll, 1000);
    } else {
      window.location.reload();
    }
  }
  if (ACTIVE.includes(box.dataset.state)) setTimeout(poll, 500);
}

document.addEventListener("DOMContentLoaded", () => {
  const box = document.getElementById("session");
  if (box) followSession(box);
  for (const form of document.querySelectorAll("form[data-confirm]")) {
    form.addEventListener("submit", (event) => {
      if (!window.confirm(form.dataset.confirm)) event.preventDefault();
    });
  }
});
