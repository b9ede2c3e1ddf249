// The console's only script (the Content-Security-Policy allows no inline one): select-all on
// the cases page, and polling a run's progress or a recheck's answer.
"use strict";

document.addEventListener("DOMContentLoaded", () => {
  const all = document.getElementById("select-all");
  if (all) {
    all.addEventListener("change", () => {
      document.querySelectorAll("input.pick").forEach((box) => { box.checked = all.checked; });
    });
  }
  const progress = document.getElementById("progress");
  if (progress && isRunning(progress.dataset.status)) {
    poll(progress.dataset.poll, showProgress);
  }
  const answer = document.getElementById("recheck-result");
  if (answer && isRunning(answer.dataset.status)) {
    poll(answer.dataset.poll, (run) => {
      if (!isRunning(run.status)) { window.location.reload(); return false; }
      return true;
    });
  }
});

function isRunning(status) { return status === "planning" || status === "running"; }

function poll(url, onRun) {
  const tick = () => {
    fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } })
      .then((r) => (r.ok ? r.json() : Promise.reject(r.status)))
      .then((run) => { if (onRun(run) !== false) setTimeout(tick, 1000); })
      .catch(() => setTimeout(tick, 3000));
  };
  setTimeout(tick, 1000);
}

function text(id, value) {
  const el = document.getElementById(id);
  if (el) el.textContent = value;
}

function duration(seconds) {
  if (seconds === null || seconds === undefined) return "-";
  const s = Math.floor(seconds), h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60);
  const pad = (n) => String(n).padStart(2, "0");
  return h ? `${h}:${pad(m)}:${pad(s % 60)}` : `${m}:${pad(s % 60)}`;
}

function showProgress(run) {
  const p = run.progress;
  text("done", p.done);
  text("planned", p.planned);
  text("percent", p.planned ? Math.round((100 * p.done) / p.planned) : 0);
  text("rate", p.rate_per_s === null ? "-" : p.rate_per_s.toFixed(1));
  text("eta", duration(p.eta_s));
  text("ok", p.ok);
  text("unobservable", p.unobservable);
  text("error", p.error);
  text("run-status", run.status);
  const bar = document.getElementById("progress-bar");
  if (bar) { bar.max = p.planned || 1; bar.value = p.done; }
  if (!isRunning(run.status)) { window.location.reload(); return false; }
  return true;
}
