(function () {
  // The function key came in the address bar (?code=); links to the other run pages carry it on, in the
  // browser only, so the server never writes the key into a page.
  var code = new URLSearchParams(window.location.search).get("code");
  if (!code) { return; }
  document.querySelectorAll("a[data-keep-code]").forEach(function (a) {
    var url = new URL(a.getAttribute("href"), window.location.href);
    url.searchParams.set("code", code);
    a.setAttribute("href", url.pathname + url.search);
  });
})();
