// Live updates: the server says "refresh" (at most once a second) when the database's NOTIFYs say
// something changed; the page's live region then re-fetches itself through htmx.
(function () {
  "use strict";
  var url = document.body.dataset.events;
  if (!url || !window.EventSource) { return; }
  var badge = document.getElementById("live-badge");
  var source = new EventSource(url);
  source.addEventListener("refresh", function () {
    if (window.htmx) { window.htmx.trigger(document.body, "aiomq-refresh"); }
  });
  source.addEventListener("open", function () { if (badge) { badge.classList.remove("offline"); } });
  source.addEventListener("error", function () { if (badge) { badge.classList.add("offline"); } });
})();
