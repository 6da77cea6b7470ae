/* Static search: loads the list's index parts (one per month, newest first)
   and matches every word of the query.  No server, no CDN, no innerHTML. */
(function () {
  "use strict";
  var status = document.getElementById("status");
  var results = document.getElementById("results");
  var input = document.getElementById("q");
  if (!status || !results) { return; }
  var months = (status.getAttribute("data-months") || "").split(" ").filter(Boolean);
  var query = new URLSearchParams(window.location.search).get("q") || "";
  if (input) { input.value = query; }
  var words = query.toLocaleLowerCase().split(/\s+/).filter(Boolean);
  if (!words.length) { status.textContent = ""; return; }
  var found = 0;
  var LIMIT = 200;
  status.textContent = status.getAttribute("data-searching") || "...";

  function fold(s) { return s.toLocaleLowerCase(); }
  function show(rec) {
    var li = document.createElement("li");
    var a = document.createElement("a");
    a.href = "m/" + encodeURIComponent(rec[0]) + ".html";
    a.textContent = rec[1] || status.getAttribute("data-no-subject") || "";
    var meta = document.createElement("span");
    meta.className = "meta";
    meta.textContent = " " + rec[2] + " · " + rec[3];
    var p = document.createElement("div");
    p.className = "meta";
    p.textContent = rec[4].slice(0, 200);
    li.appendChild(a); li.appendChild(meta); li.appendChild(p);
    results.appendChild(li);
  }
  window.listservSearchPart = function (month, records) {
    for (var i = records.length - 1; i >= 0 && found < LIMIT; i--) {
      var r = records[i];
      var hay = fold(r[1] + " " + r[2] + " " + r[4]);
      var ok = true;
      for (var w = 0; w < words.length; w++) { if (hay.indexOf(words[w]) < 0) { ok = false; break; } }
      if (ok) { found++; show(r); }
    }
  };
  var index = 0;
  function next() {
    if (index >= months.length || found >= LIMIT) {
      status.textContent = found ? (status.getAttribute("data-found") || "") + " " + found
                                 : (status.getAttribute("data-none") || "");
      return;
    }
    var s = document.createElement("script");
    s.src = "search/" + months[index++] + ".js";
    s.onload = s.onerror = function () { s.remove(); next(); };
    document.head.appendChild(s);
  }
  next();
})();
