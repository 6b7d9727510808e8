// tollgate console: progressive touches only (every page works without it).
// Times are rendered in UTC by the server; show them in the reader's time zone, with UTC on hover.
document.querySelectorAll("time[datetime]").forEach(function (t) {
  var d = new Date(t.getAttribute("datetime"));
  if (!isNaN(d)) { t.title = t.textContent; t.textContent = d.toLocaleString(); }
});
