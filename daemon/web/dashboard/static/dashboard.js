// Stoker dashboard: live updates and actions without a reload. The pages work without this
// script (forms post and come back); with it, the page's <main> is refreshed every 2 s while
// "Live" is on (remembered in this browser), and action forms are sent in the background,
// asking first when they carry data-confirm. No inline script anywhere: the CSP forbids it.
(function () {
  "use strict";
  var INTERVAL = 2000;
  var timer = null;
  var busy = false;

  function live() { return localStorage.getItem("stoker.live") !== "off"; }

  function refresh() {
    if (busy || document.hidden || !live()) { return Promise.resolve(); }
    busy = true;
    return fetch(location.href, { credentials: "same-origin", headers: { "X-Requested-With": "stoker-dashboard" } })
      .then(function (response) {
        if (response.redirected && response.url.indexOf("/dashboard/login") !== -1) {
          location.href = response.url;  // the session ended
          return null;
        }
        return response.ok ? response.text() : null;
      })
      .then(function (html) {
        if (!html) { return; }
        var fresh = new DOMParser().parseFromString(html, "text/html").getElementById("main");
        var main = document.getElementById("main");
        if (!fresh || !main) { return; }
        var active = document.activeElement;
        if (active && main.contains(active) && (active.tagName === "INPUT" || active.tagName === "SELECT")) {
          return;  // someone is typing in a filter: leave the page alone
        }
        var checked = {};
        main.querySelectorAll("input[type=checkbox][name]").forEach(function (box) {
          if (box.checked) { checked[box.name + "=" + box.value] = true; }
        });
        main.innerHTML = fresh.innerHTML;
        main.querySelectorAll("input[type=checkbox][name]").forEach(function (box) {
          if (checked[box.name + "=" + box.value]) { box.checked = true; }
        });
      })
      .catch(function () { /* the daemon is restarting: try again at the next tick */ })
      .then(function () { busy = false; });
  }

  function schedule() {
    if (timer) { clearInterval(timer); timer = null; }
    if (live()) { timer = setInterval(refresh, INTERVAL); }
  }

  document.addEventListener("submit", function (event) {
    var form = event.target;
    if (!(form instanceof HTMLFormElement) || !form.classList.contains("action")) { return; }
    var question = form.getAttribute("data-confirm");
    if (question && !window.confirm(question)) { event.preventDefault(); return; }
    event.preventDefault();
    var body = new FormData(form);
    if (event.submitter && event.submitter.name) { body.append(event.submitter.name, event.submitter.value); }
    fetch(form.action, {
      method: "POST", body: body, credentials: "same-origin",
      headers: { "X-Requested-With": "stoker-dashboard" }
    }).then(function (response) {
      if (response.status === 204) { busy = false; return refresh(); }
      return response.text().then(function (html) {
        var page = new DOMParser().parseFromString(html, "text/html");
        var message = page.querySelector("[role=alert]");
        window.alert(message ? message.textContent : "The action failed (" + response.status + ")");
      });
    });
  });

  document.addEventListener("DOMContentLoaded", function () {
    var box = document.getElementById("live");
    if (box) {
      box.checked = live();
      box.addEventListener("change", function () {
        localStorage.setItem("stoker.live", box.checked ? "on" : "off");
        schedule();
      });
    }
    schedule();
  });
})();
