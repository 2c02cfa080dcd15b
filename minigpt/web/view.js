// minigpt view: the page's side. Every number comes from the server's /api endpoints, which call
// the Python API (minigpt.load(...)); this script only draws them. Nothing is fetched from elsewhere.
"use strict";

const $ = (id) => document.getElementById(id);
const state = {
  chars: [],        // the text on the page, one entry per character (code point), as the server counts them
  promptLength: 0,  // how many of them came from the prompt
  reading: null,    // /api/read's answer for the text: bits and expected characters per position
  position: null,   // the clicked character
  attention: null,  // /api/attention's answer for it
  layer: 0, head: 0,
};

async function api(path, body) {
  const options = body === undefined ? {} : { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) };
  const response = await fetch(path, options);
  const data = await response.json().catch(() => ({ error: `the server answered ${response.status} without JSON` }));
  if (!response.ok || data.error) throw new Error(data.error || `the server answered ${response.status}`);
  return data;
}

function showMessage(text) {
  $("message").textContent = text;
  $("message").hidden = !text;
}

function settings() {
  const value = (id) => $(id).value.trim();
  return { prompt: $("prompt").value, temperature: value("temperature"), top_k: value("top_k"), top_p: value("top_p"),
           seed: value("seed"), length: value("length"), unknown: $("unknown").value };
}

function shown(ch) { return ch === "\n" ? "↵\n" : ch === "\t" ? "→\t" : ch; }

function isolated(ch) {  // a character in quotes, kept from reordering its line (Arabic, Hebrew)
  return `\u2068${JSON.stringify(ch)}\u2069`;
}

function shade(bits) {  // 0 bits: white, 8 bits or more: strong red
  const alpha = bits == null ? 0 : Math.min(bits / 8, 1) * 0.75;
  return `rgba(211, 47, 47, ${alpha.toFixed(3)})`;
}

function drawText() {
  const box = $("text");
  box.replaceChildren();
  state.chars.forEach((ch, i) => {
    const span = document.createElement("span");
    span.className = "ch" + (ch === "\n" ? " nl" : "") + (i < state.promptLength ? " prompt" : "");
    span.textContent = shown(ch);
    span.dataset.i = i;
    const bits = state.reading ? state.reading.bits[i] : null;
    if (bits != null) { span.dataset.bits = bits; span.style.background = shade(bits); }
    if (i === state.position) span.classList.add("chosen");
    box.appendChild(span);
  });
}

async function generate() {
  showMessage("");
  const body = settings();
  state.chars = Array.from(body.prompt); state.promptLength = state.chars.length;
  state.reading = null; state.position = null;
  $("look").hidden = true;
  $("text").dataset.state = "generating";
  $("status").textContent = "generating...";
  $("generate").disabled = true;
  drawText();
  try {
    const response = await fetch("/api/generate", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
    if (!response.ok) throw new Error((await response.json()).error);
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n")) >= 0) {
        const message = JSON.parse(buffer.slice(0, end));
        buffer = buffer.slice(end + 1);
        if (message.error) throw new Error(message.error);
        if (message.piece) { state.chars.push(...Array.from(message.piece)); drawText(); }
      }
    }
    await read();
  } catch (error) {
    showMessage(error.message);
    $("text").dataset.state = "error";
    $("status").textContent = "";
  } finally {
    $("generate").disabled = false;
  }
}

async function read(fromPrompt = false) {
  if (fromPrompt) {
    showMessage("");
    state.chars = Array.from($("prompt").value); state.promptLength = state.chars.length; state.position = null;
    $("look").hidden = true;
  }
  $("status").textContent = "scoring...";
  try {
    const reading = await api("/api/read", { text: state.chars.join(""), unknown: $("unknown").value });
    state.reading = reading;
    state.chars = reading.chars;  // as the model read them (unknown characters skipped or replaced)
    state.promptLength = Math.min(state.promptLength, state.chars.length);
    drawText();
    $("text").dataset.state = "done";
    $("status").textContent = `${reading.mean_bits.toFixed(3)} bits per character on average over ${reading.chars.length - 1} ` +
      "characters (the first has no context). Hover for what the model expected; click to see where it looks.";
  } catch (error) {
    showMessage(error.message);
    $("text").dataset.state = "error";
    $("status").textContent = "";
  }
}

function tipFor(i) {
  const r = state.reading;
  if (!r) return null;
  if (i === 0) return "the first character: no context, not scored";
  const expected = r.top[i].map(([ch, p]) => `${isolated(ch)}   ${(100 * p).toFixed(1).padStart(5)}%`).join("\n");
  return `${isolated(r.chars[i])}: ${r.bits[i].toFixed(2)} bits\nthe model expected:\n${expected}`;
}

function onHover(event) {
  const span = event.target.closest(".ch");
  const tip = $("tip");
  const text = span ? tipFor(Number(span.dataset.i)) : null;
  if (!text) { tip.hidden = true; return; }
  tip.textContent = text;
  tip.hidden = false;
  tip.style.left = `${event.clientX + 14}px`;
  tip.style.top = `${event.clientY + 14}px`;
}

async function onClick(event) {
  const span = event.target.closest(".ch");
  if (!span || $("text").dataset.state !== "done") return;
  showMessage("");
  state.position = Number(span.dataset.i);
  drawText();
  try {
    state.attention = await api("/api/attention", { text: state.chars.join(""), position: state.position, unknown: $("unknown").value });
    $("focus").textContent = `${JSON.stringify(state.chars[state.position])} (character ${state.position})`;
    $("look").hidden = false;
    drawHeads();
    await chooseHead(state.layer, state.head);
  } catch (error) {
    showMessage(error.message);
  }
}

function drawHeads() {
  const weights = state.attention.weights;  // [layer][head][key]
  const grid = $("heads");
  grid.replaceChildren();
  const nHead = weights[0].length;
  grid.style.gridTemplateColumns = `auto repeat(${nHead}, minmax(0, 1fr))`;
  weights.forEach((heads, layer) => {
    const label = document.createElement("div");
    label.className = "label"; label.textContent = `layer ${layer}`;
    grid.appendChild(label);
    heads.forEach((row, head) => grid.appendChild(miniHead(row, layer, head)));
  });
}

function miniHead(row, layer, head) {  // the window as small squares, 32 to a line, darker where it looks
  const box = document.createElement("div");
  box.className = "mini" + (layer === state.layer && head === state.head ? " chosen" : "");
  box.dataset.layer = layer; box.dataset.head = head;
  box.title = `layer ${layer}, head ${head}`;
  const cell = 4, perLine = 32;
  const canvas = document.createElement("canvas");
  canvas.width = perLine * cell; canvas.height = Math.ceil(row.length / perLine) * cell;
  const ctx = canvas.getContext("2d");
  const top = Math.max(...row);
  row.forEach((w, j) => {
    ctx.fillStyle = `rgba(21, 101, 192, ${(w / top).toFixed(3)})`;
    ctx.fillRect((j % perLine) * cell, Math.floor(j / perLine) * cell, cell - 1, cell - 1);
  });
  const caption = document.createElement("span");
  caption.textContent = `head ${head}`;
  box.append(canvas, caption);
  box.addEventListener("click", () => chooseHead(layer, head));
  return box;
}

async function chooseHead(layer, head) {
  state.layer = layer; state.head = head;
  document.querySelectorAll(".heads .mini").forEach((m) =>
    m.classList.toggle("chosen", Number(m.dataset.layer) === layer && Number(m.dataset.head) === head));
  const a = state.attention;
  const row = a.weights[layer][head];
  const top = Math.max(...row);
  $("big-title").textContent = `Layer ${layer}, head ${head}: the weights over the ${a.chars.length} characters it sees`;
  const big = $("big");
  big.replaceChildren();
  big.dataset.layer = layer; big.dataset.head = head;
  a.chars.forEach((ch, j) => {
    const span = document.createElement("span");
    span.className = "key" + (j === a.chars.length - 1 ? " query" : "");
    span.textContent = shown(ch);
    span.dataset.weight = row[j];
    span.title = `${JSON.stringify(ch)} (character ${a.start + j}): weight ${row[j].toFixed(4)}`;
    span.style.background = `rgba(21, 101, 192, ${(0.85 * row[j] / top).toFixed(3)})`;
    big.appendChild(span);
  });
  try {
    drawExplanation(await api("/api/explain", { text: state.chars.join(""), position: state.position, layer, head, unknown: $("unknown").value }));
  } catch (error) {
    showMessage(error.message);
  }
}

function drawExplanation(e) {
  const table = document.createElement("table");
  const number = (v) => v === null ? "-inf" : Math.abs(v) >= 100 ? v.toFixed(0) : v.toFixed(3);
  for (const step of e.steps) {
    const tr = document.createElement("tr");
    const th = document.createElement("th");
    th.textContent = step.key;
    th.title = step.title;
    const td = document.createElement("td");
    const title = document.createElement("div");
    title.textContent = step.title;
    const nums = document.createElement("div");
    nums.className = "nums";
    step.values.forEach((v, j) => {
      const span = document.createElement("span");
      if (step.columns === "characters") {
        const label = document.createElement("b");
        label.textContent = JSON.stringify(e.chars[j]).slice(1, -1);
        span.appendChild(label);
      }
      span.appendChild(document.createTextNode(number(v)));
      span.dataset.value = v === null ? "-inf" : v;
      nums.appendChild(span);
    });
    td.append(title, nums);
    tr.append(th, td);
    table.appendChild(tr);
  }
  const next = document.createElement("tr");
  next.innerHTML = "<th>next</th><td></td>";
  next.lastChild.textContent = "the model's five most likely next characters: " +
    e.next.map(([ch, p]) => `${JSON.stringify(ch)} ${(100 * p).toFixed(1)}%`).join(", ");
  table.appendChild(next);
  $("explain").replaceChildren(table);
  $("explain").dataset.layer = e.layer; $("explain").dataset.head = e.head;
}

function row(table, name, value) {
  const tr = document.createElement("tr");
  const th = document.createElement("th"); th.textContent = name;
  const td = document.createElement("td"); td.textContent = value;
  td.dataset.key = name;
  tr.append(th, td);
  table.appendChild(tr);
  return td;
}

async function loadInfo() {
  const table = $("info");
  try {
    const info = await api("/api/info");
    const m = info.config.model;
    $("checkpoint").textContent = info.checkpoint;
    document.title = `minigpt view: ${info.checkpoint}`;
    row(table, "corpus", info.corpus || "?");
    row(table, "shape", `${m.n_layer} layers x ${m.n_embd} wide, ${m.n_head} heads, block ${m.block_size}, ${m.position || ""} positions`);
    row(table, "parameters", info.parameters.toLocaleString("en"));
    row(table, "step", info.step.toLocaleString("en"));
    row(table, "best val loss", info.best_val_loss == null ? "none yet" :
      `${info.best_val_loss.toFixed(4)} nats (${info.best_val_bpc.toFixed(4)} bits/char, a random-batch estimate)`);
    const exact = row(table, "exact val", "computing...");
    row(table, "vocabulary", `${info.vocab_size} characters: ${JSON.stringify(info.vocabulary)}`);
    row(table, "device", info.device);
    if (info.init_from) row(table, "fine-tuned from", info.init_from);
    const config = document.createElement("pre");  // the resolved config, section by section, as config.yaml has it
    config.textContent = Object.entries(info.config).map(([section, values]) => typeof values !== "object" || values === null
      ? `${section}: ${JSON.stringify(values)}`
      : `${section}:\n` + Object.entries(values).map(([k, v]) => `  ${k}: ${JSON.stringify(v)}`).join("\n")).join("\n");
    row(table, "config", "").appendChild(config);
    api("/api/exact").then((x) => { exact.textContent = `${x.loss.toFixed(4)} nats, ${x.bpc.toFixed(4)} bits/char over ${x.characters.toLocaleString("en")} characters`; })
      .catch((error) => { exact.textContent = error.message; });
  } catch (error) {
    showMessage(error.message);
  }
  api("/api/curves").then(drawCurves).catch((error) => { $("curves").textContent = error.message; });
}

function drawCurves(curves) {  // one SVG: loss against step, a line per tag
  const W = 420, H = 240, L = 44, B = 26, colors = { "train/loss": "#1565c0", "val/loss": "#d32f2f" };
  const points = Object.values(curves).flat();
  const steps = points.map((p) => p[0]), losses = points.map((p) => p[1]);
  const x0 = Math.min(...steps), x1 = Math.max(...steps, x0 + 1), y0 = Math.min(...losses), y1 = Math.max(...losses, y0 + 1e-6);
  const x = (s) => L + (W - L - 8) * (s - x0) / (x1 - x0), y = (v) => 8 + (H - B - 8) * (1 - (v - y0) / (y1 - y0));
  let svg = `<svg xmlns="http://www.w3.org/2000/svg" width="${W}" height="${H}" role="img" aria-label="loss curves">`;
  svg += `<line x1="${L}" y1="${H - B}" x2="${W - 8}" y2="${H - B}" stroke="#999"/><line x1="${L}" y1="8" x2="${L}" y2="${H - B}" stroke="#999"/>`;
  svg += `<text x="${L - 4}" y="12" text-anchor="end">${y1.toFixed(2)}</text><text x="${L - 4}" y="${H - B}" text-anchor="end">${y0.toFixed(2)}</text>`;
  svg += `<text x="${L}" y="${H - 8}">step ${x0}</text><text x="${W - 8}" y="${H - 8}" text-anchor="end">${x1}</text>`;
  Object.entries(curves).forEach(([tag, series], k) => {
    const color = colors[tag] || "#555";
    svg += `<polyline fill="none" stroke="${color}" stroke-width="1.5" points="${series.map(([s, v]) => `${x(s).toFixed(1)},${y(v).toFixed(1)}`).join(" ")}"/>`;
    svg += `<text x="${W - 12}" y="${20 + 14 * k}" text-anchor="end" style="fill:${color}">${tag}</text>`;
  });
  $("curves").innerHTML = svg + "</svg>";
}

$("generate").addEventListener("click", generate);
$("read").addEventListener("click", () => read(true));
$("text").addEventListener("mousemove", onHover);
$("text").addEventListener("mouseleave", () => { $("tip").hidden = true; });
$("text").addEventListener("click", onClick);
loadInfo();
