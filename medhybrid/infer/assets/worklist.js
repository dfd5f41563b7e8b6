// The worklist's table (index.html): click a column header to sort (again to reverse), type in the filter
// box or pick a decision to narrow the rows, and move with the keyboard: j / ArrowDown and k / ArrowUp
// select a row, Enter (or o) opens its report, "/" focuses the filter, Escape clears it.
// Inlined in index.html by medhybrid/infer/render.py; no network, no library.
(function () {
  "use strict";
  var table = document.getElementById("worklist");
  if (!table) { return; }
  var body = table.tBodies[0];
  var rows = Array.prototype.slice.call(body.rows);
  var filter = document.getElementById("filter");
  var decision = document.getElementById("decision-filter");
  var count = document.getElementById("shown");
  var selected = -1;

  function visible() {
    return rows.filter(function (r) { return !r.hidden; });
  }

  function value(row, col, numeric) {
    var cell = row.cells[col];
    var v = cell.getAttribute("data-v");
    if (v === null) { v = cell.textContent.trim(); }
    if (!numeric) { return v.toLowerCase(); }
    var x = parseFloat(v);
    return isNaN(x) ? -Infinity : x;  // no score (NOT ASSESSED) sorts below every score
  }

  function sortBy(th) {
    var col = th.cellIndex;
    var numeric = th.getAttribute("data-type") === "number";
    var descending = th.getAttribute("aria-sort") !== "descending";
    Array.prototype.forEach.call(th.parentNode.cells, function (h) { h.removeAttribute("aria-sort"); });
    th.setAttribute("aria-sort", descending ? "descending" : "ascending");
    rows.sort(function (a, b) {
      var x = value(a, col, numeric), y = value(b, col, numeric);
      var c = x < y ? -1 : x > y ? 1 : 0;
      return descending ? -c : c;
    });
    rows.forEach(function (r) { body.appendChild(r); });
    select(selected >= 0 ? selected : -1);
  }

  function applyFilter() {
    var text = (filter.value || "").trim().toLowerCase();
    var want = decision.value;
    rows.forEach(function (r) {
      var okText = !text || r.textContent.toLowerCase().indexOf(text) >= 0;
      var okDecision = !want || r.getAttribute("data-decision") === want;
      r.hidden = !(okText && okDecision);
    });
    var shown = visible();
    count.textContent = shown.length + " of " + rows.length + " shown";
    select(shown.length ? 0 : -1);
  }

  function select(index) {
    var shown = visible();
    rows.forEach(function (r) { r.classList.remove("sel"); r.removeAttribute("aria-selected"); });
    if (index < 0 || !shown.length) { selected = -1; return; }
    selected = Math.max(0, Math.min(index, shown.length - 1));
    var row = shown[selected];
    row.classList.add("sel");
    row.setAttribute("aria-selected", "true");
    if (row.scrollIntoView) { row.scrollIntoView({ block: "nearest" }); }
  }

  Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th) {
    if (th.getAttribute("data-type")) {
      th.tabIndex = 0;
      th.addEventListener("click", function () { sortBy(th); });
      th.addEventListener("keydown", function (e) { if (e.key === "Enter") { sortBy(th); } });
    }
  });
  filter.addEventListener("input", applyFilter);
  decision.addEventListener("change", applyFilter);
  rows.forEach(function (r) {
    r.addEventListener("click", function () { select(visible().indexOf(r)); });
  });
  document.addEventListener("keydown", function (e) {
    var typing = e.target === filter;
    if (e.key === "/" && !typing) { e.preventDefault(); filter.focus(); return; }
    if (e.key === "Escape") { filter.value = ""; decision.value = ""; applyFilter(); filter.blur(); return; }
    if (typing && e.key !== "ArrowDown" && e.key !== "ArrowUp" && e.key !== "Enter") { return; }
    if (e.key === "j" || e.key === "ArrowDown") { e.preventDefault(); select(selected + 1); }
    else if (e.key === "k" || e.key === "ArrowUp") { e.preventDefault(); select(selected - 1); }
    else if (e.key === "Enter" || e.key === "o") {
      var row = visible()[selected];
      var link = row && row.querySelector("a[href]");
      if (link) { e.preventDefault(); window.location.href = link.getAttribute("href"); }
    }
  });
  applyFilter();
})();
