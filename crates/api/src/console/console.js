// tollgate console: progressive touches only (every page works without it).
// Times are rendered in UTC by the server; show them in the reader's time zone, with UTC on hover.
document.querySelectorAll("time[datetime]").forEach(function (t) {
  var d = new Date(t.getAttribute("datetime"));
  if (!isNaN(d)) { t.title = t.textContent; t.textContent = d.toLocaleString(); }
});

// Session replay: the timeline's entries shown again at their recorded offsets (data-offset-ms),
// sped up by the chosen factor. Without this script the whole timeline is simply shown.
var timeline = document.getElementById("timeline");
var controls = document.getElementById("replay-controls");
if (timeline && controls) {
  controls.hidden = false;
  var timers = [];
  var clock = document.getElementById("replay-clock");
  document.getElementById("replay").addEventListener("click", function () {
    timers.forEach(clearTimeout);
    timers = [];
    var speed = Number(document.getElementById("replay-speed").value) || 1;
    var entries = Array.prototype.slice.call(timeline.querySelectorAll("li.event"));
    entries.forEach(function (li) { li.classList.add("replaying"); });
    var shown = 0;
    clock.textContent = "0 / " + entries.length;
    entries.forEach(function (li) {
      var at = Math.max(0, Number(li.getAttribute("data-offset-ms")) || 0) / speed;
      timers.push(setTimeout(function () {
        li.classList.remove("replaying");
        shown += 1;
        clock.textContent = shown + " / " + entries.length;
        if (shown === entries.length) { clock.textContent += " · done"; }
      }, at));
    });
  });
}
