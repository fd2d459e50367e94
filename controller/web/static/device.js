// Live parts of a device page: the server renders each region, this only swaps it in by its data-live name.
// Forms stay as they are (a half-typed reason is never lost); one shown only in some state (data-show-when,
// e.g. acknowledging a fault) follows the flags the live regions carry (data-flags).
// A stream that ends (signed out, idle logout, panel restarted) sends the page back to the login.
"use strict";
(function () {
  const page = document.querySelector("main[data-events]");
  const events = new EventSource(page.dataset.events);

  function followFlags() {
    const flags = new Set();
    document.querySelectorAll("[data-flags]").forEach(function (element) {
      element.dataset.flags.split(" ").forEach(function (flag) {
        if (flag) {
          flags.add(flag);
        }
      });
    });
    document.querySelectorAll("[data-show-when]").forEach(function (element) {
      element.hidden = !flags.has(element.dataset.showWhen);
    });
  }

  document.querySelectorAll("[data-live]").forEach(function (region) {
    events.addEventListener(region.dataset.live, function (event) {
      region.innerHTML = event.data;
      followFlags();
    });
  });
  events.addEventListener("signed-out", function () {
    events.close();
    window.location.assign("/login");
  });
  events.addEventListener("error", function () {
    if (events.readyState === EventSource.CLOSED) {
      window.location.reload();
    }
  });
})();
