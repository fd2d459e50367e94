// Live updates of the lab overview: the server renders the fragment, this only swaps it in.
// A stream that ends (signed out, idle logout, panel restarted) sends the page back to the login.
"use strict";
(function () {
  const lab = document.getElementById("lab");
  const events = new EventSource(lab.dataset.events);
  events.addEventListener("lab", function (event) {
    lab.innerHTML = event.data;
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
