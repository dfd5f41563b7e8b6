/* The medhybrid report viewer: every slice of the embedded volume in up to three planes, with overlays.
   Its data is the JSON in #mh-viewer-data (written by medhybrid/infer/viewer.py); the controls are the
   section's HTML. Vanilla JS and canvas 2D: no library, no network. */
"use strict";
(function () {
  const root = document.getElementById("mh-viewer");
  const dataNode = document.getElementById("mh-viewer-data");
  if (!root || !dataNode) return;
  const cfg = JSON.parse(dataNode.textContent);
  const status = root.querySelector(".mh-status");
  const cursor = root.querySelector(".mh-cursor");
  const N = cfg.shape[0] * cfg.shape[1] * cfg.shape[2];
  const VIEW_PX = cfg.views.length === 1 ? 512 : 320; // a view's longer side, in screen pixels
  const state = { low: 0, high: 1, image: null, overlays: [], views: [], drag: null };
  const LUT = Array.from({ length: 256 }, (_, s) => cfg.lut.slice(3 * s, 3 * s + 3)); // saliency colours

  // a base64 data URI of zlib data -> bytes, inflated by the browser itself (no fetch: nothing is requested)
  async function inflate(uri) {
    const text = atob(uri.slice(uri.indexOf(",") + 1));
    const bytes = new Uint8Array(text.length);
    for (let i = 0; i < text.length; i++) bytes[i] = text.charCodeAt(i);
    const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("deflate"));
    return new Uint8Array(await new Response(stream).arrayBuffer());
  }

  const toValue = (q) => q * cfg.image.slope + cfg.image.intercept;
  const fmt = (v) => (Math.abs(v) >= 100 || Number.isInteger(v) ? v.toFixed(0) : v.toPrecision(3));
  const unit = cfg.image.unit ? " " + cfg.image.unit : "";

  function setWindow(low, high) {
    state.low = low;
    state.high = Math.max(high, low + 1e-6 * Math.max(1, Math.abs(low)));
    const width = state.high - state.low;
    root.querySelector(".mh-wl").textContent = `W ${fmt(width)} L ${fmt(state.low + width / 2)}${unit}`;
  }

  function makeView(spec) {
    const el = root.querySelector(`.mh-view[data-view="${spec.id}"]`);
    const ca = spec.col[0], ra = spec.row[0];
    const v = {
      spec, el, slice: spec.start,
      cols: cfg.shape[ca], rows: cfg.shape[ra], depth: cfg.shape[spec.slice],
      canvas: el.querySelector("canvas"), label: el.querySelector(".mh-slice"), scroll: el.querySelector(".mh-scroll"),
      off: document.createElement("canvas"),
    };
    // the physical aspect ratio (from the spacing), the longer side VIEW_PX long
    const widthMm = v.cols * cfg.spacing[ca], heightMm = v.rows * cfg.spacing[ra];
    const pxPerMm = VIEW_PX / Math.max(widthMm, heightMm);
    v.canvas.width = Math.max(1, Math.round(widthMm * pxPerMm));
    v.canvas.height = Math.max(1, Math.round(heightMm * pxPerMm));
    v.pxPerMm = v.canvas.width / (v.cols * cfg.spacing[ca]);
    v.off.width = v.cols;
    v.off.height = v.rows;
    v.offCtx = v.off.getContext("2d");
    v.pixels = v.offCtx.createImageData(v.cols, v.rows);
    v.ctx = v.canvas.getContext("2d");
    return v;
  }

  // the display-frame voxel [x, y, z] under pixel (c, r) of a view
  function voxel(v, c, r) {
    const p = [0, 0, 0];
    p[v.spec.col[0]] = v.spec.col[1] > 0 ? c : v.cols - 1 - c;
    p[v.spec.row[0]] = v.spec.row[1] > 0 ? r : v.rows - 1 - r;
    p[v.spec.slice] = v.slice;
    return p;
  }
  // where a grid (the volume's, or a coarser saliency grid) holds display voxel p
  function gridIndex(grid, p) {
    const [gx, gy] = grid.shape, step = grid.step;
    return Math.floor(p[0] / step[0]) + gx * (Math.floor(p[1] / step[1]) + gy * Math.floor(p[2] / step[2]));
  }

  // a grid's index of each column and row of a view and of its slice: index = base + rows[r] + cols[c]
  function lookup(v, grid) {
    const stride = [1, grid.shape[0], grid.shape[0] * grid.shape[1]];
    const along = ([axis, sign], n, k) => Math.floor((sign > 0 ? k : n - 1 - k) / grid.step[axis]) * stride[axis];
    return {
      cols: Int32Array.from({ length: v.cols }, (_, c) => along(v.spec.col, v.cols, c)),
      rows: Int32Array.from({ length: v.rows }, (_, r) => along(v.spec.row, v.rows, r)),
      base: Math.floor(v.slice / grid.step[v.spec.slice]) * stride[v.spec.slice],
    };
  }

  function isEdge(values, at, v, c, r, s) {
    const row = at.base + at.rows[r];
    return (c > 0 && values[row + at.cols[c - 1]] !== s) || (c < v.cols - 1 && values[row + at.cols[c + 1]] !== s) ||
      (r > 0 && values[at.base + at.rows[r - 1] + at.cols[c]] !== s) ||
      (r < v.rows - 1 && values[at.base + at.rows[r + 1] + at.cols[c]] !== s);
  }

  function draw(v) {
    const img = state.image.values, d = v.pixels.data, at = lookup(v, state.image);
    const q0 = (state.low - cfg.image.intercept) / cfg.image.slope;
    const gain = 255 / ((state.high - state.low) / cfg.image.slope);
    const layers = state.overlays.filter((o) => o.on && o.opacity > 0).map((o) => ({ o, at: lookup(v, o) }));
    for (let r = 0, p = 0; r < v.rows; r++) {
      const row = at.base + at.rows[r];
      for (let c = 0; c < v.cols; c++, p += 4) {
        const g = Math.min(255, Math.max(0, (img[row + at.cols[c]] - q0) * gain));
        let R = g, G = g, B = g;
        for (const layer of layers) {
          const o = layer.o, s = o.values[layer.at.base + layer.at.rows[r] + layer.at.cols[c]];
          if (s === 0) continue;
          let rgb, a;
          if (o.kind === "labels") {
            rgb = o.colours[s % o.colours.length];
            a = isEdge(o.values, layer.at, v, c, r, s) ? Math.min(1, 2 * o.opacity) : o.opacity;
          } else {
            rgb = LUT[s];
            a = (o.opacity * s) / 255;
          }
          R += (rgb[0] - R) * a;
          G += (rgb[1] - G) * a;
          B += (rgb[2] - B) * a;
        }
        d[p] = R; d[p + 1] = G; d[p + 2] = B; d[p + 3] = 255;
      }
    }
    v.offCtx.putImageData(v.pixels, 0, 0);
    v.ctx.imageSmoothingEnabled = true;
    v.ctx.drawImage(v.off, 0, 0, v.canvas.width, v.canvas.height);
    if (cfg.oriented) scaleBar(v);
    v.label.textContent = `${v.spec.labels[v.slice]} (${v.slice + 1} of ${v.depth})`;
    v.scroll.value = String(v.slice);
  }

  function scaleBar(v) {
    const target = v.canvas.width / 4 / v.pxPerMm; // about a quarter of the view, in mm
    const p = 10 ** Math.floor(Math.log10(target));
    const mm = [5, 2, 1].map((m) => m * p).find((m) => m <= target);
    const ctx = v.ctx, y = v.canvas.height - 8, x0 = 8, x1 = 8 + mm * v.pxPerMm;
    ctx.lineCap = "butt";
    for (const [colour, width] of [["#000", 4], ["#fff", 2]]) {
      ctx.strokeStyle = colour;
      ctx.lineWidth = width;
      ctx.beginPath();
      ctx.moveTo(x0, y); ctx.lineTo(x1, y);
      ctx.stroke();
    }
    ctx.font = "11px system-ui, sans-serif";
    ctx.fillStyle = "#fff";
    ctx.fillText(`${mm} mm`, x0, y - 5);
  }

  const drawAll = () => state.views.forEach(draw);

  function step(v, delta) {
    const next = Math.min(v.depth - 1, Math.max(0, v.slice + delta));
    if (next !== v.slice) {
      v.slice = next;
      draw(v);
    }
  }

  function jumpTo(p) {
    for (const v of state.views) v.slice = Math.min(v.depth - 1, Math.max(0, p[v.spec.slice]));
    drawAll();
  }

  function pixelAt(v, e) {
    const rect = v.canvas.getBoundingClientRect();
    const c = Math.floor(((e.clientX - rect.left) / rect.width) * v.cols);
    const r = Math.floor(((e.clientY - rect.top) / rect.height) * v.rows);
    return [Math.min(v.cols - 1, Math.max(0, c)), Math.min(v.rows - 1, Math.max(0, r))];
  }

  function readout(v, e) {
    const p = voxel(v, ...pixelAt(v, e));
    const parts = [`${v.spec.title}: value ${fmt(toValue(state.image.values[gridIndex(state.image, p)]))}${unit}`];
    if (cfg.oriented) {
      const w = [0, 1, 2].map((a) => cfg.affine[a].reduce((sum, m, k) => sum + m * (k < 3 ? p[k] : 1), 0));
      parts.push(`RAS (${w.map((x) => x.toFixed(1)).join(", ")}) mm`);
    } else {
      parts.push(`voxel (${p.join(", ")})`);
    }
    for (const o of state.overlays) {
      const s = o.values[gridIndex(o, p)];
      parts.push(o.kind === "labels" ? `${o.title}: ${s ? o.names[s] || "label " + s : "none"}` : `${o.title} ${(s / 255).toFixed(2)}`);
    }
    cursor.textContent = parts.join(" · ");
  }

  function wire(v) {
    const canvas = v.canvas;
    canvas.addEventListener("wheel", (e) => { e.preventDefault(); step(v, e.deltaY > 0 ? 1 : -1); }, { passive: false });
    canvas.addEventListener("keydown", (e) => {
      const delta = { ArrowUp: 1, ArrowRight: 1, PageUp: 10, ArrowDown: -1, ArrowLeft: -1, PageDown: -10,
        Home: -v.depth, End: v.depth }[e.key];
      if (delta) { e.preventDefault(); step(v, delta); }
    });
    v.scroll.addEventListener("input", () => { v.slice = Number(v.scroll.value); draw(v); });
    canvas.addEventListener("mousemove", (e) => readout(v, e));
    canvas.addEventListener("mousedown", (e) => {
      if (e.button !== 0) return;
      e.preventDefault();
      canvas.focus();
      state.drag = { v, x: e.clientX, y: e.clientY, at: pixelAt(v, e), low: state.low, high: state.high, moved: false };
    });
  }

  // drag: right widens the window, up raises the level; a click without a drag shows that point in every plane
  window.addEventListener("mousemove", (e) => {
    const drag = state.drag;
    if (!drag) return;
    const dx = e.clientX - drag.x, dy = e.clientY - drag.y;
    if (Math.abs(dx) + Math.abs(dy) > 3) drag.moved = true;
    if (!drag.moved) return;
    const width = drag.high - drag.low;
    const next = width * Math.exp(dx / 200);
    const level = (drag.low + drag.high) / 2 - (dy * width) / 200;
    setWindow(level - next / 2, level + next / 2);
    root.querySelectorAll(".mh-preset").forEach((b) => b.classList.remove("on"));
    drawAll();
  });
  window.addEventListener("mouseup", () => {
    const drag = state.drag;
    state.drag = null;
    if (drag && !drag.moved) jumpTo(voxel(drag.v, ...drag.at));
  });

  function wireControls() {
    root.querySelectorAll(".mh-preset").forEach((button) => button.addEventListener("click", () => {
      root.querySelectorAll(".mh-preset").forEach((b) => b.classList.toggle("on", b === button));
      setWindow(Number(button.dataset.low), Number(button.dataset.high));
      drawAll();
    }));
    const overlay = (id) => state.overlays.find((o) => o.id === id);
    root.querySelectorAll(".mh-toggle").forEach((box) => {
      overlay(box.dataset.overlay).on = box.checked;
      box.addEventListener("change", () => { overlay(box.dataset.overlay).on = box.checked; drawAll(); });
    });
    root.querySelectorAll(".mh-opacity").forEach((range) => {
      overlay(range.dataset.overlay).opacity = Number(range.value) / 100;
      range.addEventListener("input", () => { overlay(range.dataset.overlay).opacity = Number(range.value) / 100; drawAll(); });
    });
    root.querySelectorAll(".mh-findings button").forEach((button) =>
      button.addEventListener("click", () => jumpTo(button.dataset.at.split(",").map(Number))));
  }

  async function start() {
    if (typeof DecompressionStream === "undefined") {
      status.textContent = "This browser cannot open the viewer (no DecompressionStream); the key slices below are static.";
      return;
    }
    status.textContent = "Loading the viewer…";
    const ids = ["image", ...cfg.overlays.map((o) => o.id)];
    const buffers = await Promise.all(ids.map((id) => inflate(cfg.data[id])));
    const planes = buffers[0]; // low bytes, then high bytes
    const values = new Uint16Array(N);
    for (let i = 0; i < N; i++) values[i] = planes[i] | (planes[N + i] << 8);
    state.image = { ...cfg.grids.image, values };
    state.overlays = cfg.overlays.map((o, k) => ({ ...o, ...cfg.grids[o.id], values: buffers[k + 1], on: false, opacity: 0.5 }));
    state.views = cfg.views.map(makeView);
    state.views.forEach(wire);
    wireControls();
    const preset = root.querySelector(".mh-preset.on") || root.querySelector(".mh-preset");
    setWindow(Number(preset.dataset.low), Number(preset.dataset.high));
    drawAll();
    status.textContent = "";
    root.dataset.ready = "1";
  }

  start().catch((err) => {
    status.textContent = `The viewer could not start: ${err}`;
    root.dataset.ready = "error";
    console.error(err);
  });
})();
