// Refreshes the open-orders table in place while the page is visible: the page works without it.
(function () {
  "use strict";
  const live = document.getElementById("orders-live");
  if (!live) return;
  const url = live.dataset.rowsUrl;
  const seconds = Number(live.dataset.refreshSeconds) || 15;
  let etag = null;
  async function refresh() {
    if (document.hidden) return;
    try {
      const response = await fetch(url, {
        credentials: "same-origin",
        headers: etag ? { "If-None-Match": etag } : {},
      });
      if (response.status === 401) { window.location.reload(); return; }
      if (response.status !== 200) return;
      etag = response.headers.get("ETag");
      const focused = document.activeElement && live.contains(document.activeElement)
        ? document.activeElement.getAttribute("href") : null;
      live.innerHTML = await response.text();
      live.dataset.refreshedAt = String(Date.now());
      if (focused) {
        const again = live.querySelector('a[href="' + CSS.escape(focused) + '"]');
        if (again) again.focus();
      }
    } catch (error) {
      live.dataset.refreshError = String(error);
    }
  }
  window.setInterval(refresh, seconds * 1000);
  document.addEventListener("visibilitychange", refresh);
})();
