// Samples digits from a sampler graph written by `toolkit export onnx` (seed-only: the graph makes its own
// noise), with onnxruntime-web: WebGPU where the browser has it, else WebAssembly. The same seed gives the
// same digits as `toolkit compose --class all -n 80 --seed S`. Query parameters: graph=FILE.onnx (default
// sampler.onnx, with its metadata FILE.onnx.json beside it), seed=S, ep=wasm|webgpu, report=1 (tests: POST
// the numbers and the canvas to /report).
import * as ort from "./node_modules/onnxruntime-web/dist/ort.all.min.mjs";

const params = new URLSearchParams(location.search);
const graph = params.get("graph") || "sampler.onnx";
const $ = (id) => document.getElementById(id);
const PER_ROW = 8, SCALE = 6, PAD = 2;

function status(text, error = false) {
  $("status").textContent = text;
  $("status").className = error ? "error" : "";
}

async function loadMetadata() {
  const response = await fetch(`${graph}.json`);
  if (!response.ok) throw new Error(`${graph}.json: HTTP ${response.status}`);
  const meta = await response.json();
  if (meta.kind !== "diffusion-toolkit-sampler" || !meta.inputs.includes("seed"))
    throw new Error(`${graph} is not a seed-only diffusion-toolkit sampler graph`);
  return meta;
}

function labelsFor(meta, choice) {
  const K = meta.num_classes;
  if (K === null) return { n: 4 * PER_ROW, labels: null };
  if (choice === "all") return { n: K * PER_ROW, labels: Array.from({ length: K * PER_ROW }, (_, i) => Math.floor(i / PER_ROW)) };
  const label = choice === "any" ? K : Number(choice);  // K: the null label, any class
  return { n: 4 * PER_ROW, labels: Array(4 * PER_ROW).fill(label) };
}

function draw(data, dims) {
  const [n, c, h, w] = dims;
  const rows = Math.ceil(n / PER_ROW);
  const canvas = $("canvas");
  canvas.width = PER_ROW * (w * SCALE + PAD) + PAD;
  canvas.height = rows * (h * SCALE + PAD) + PAD;
  const ctx = canvas.getContext("2d");
  ctx.fillStyle = "#808080";
  ctx.fillRect(0, 0, canvas.width, canvas.height);
  const image = ctx.createImageData(w, h);
  const tile = document.createElement("canvas");
  tile.width = w; tile.height = h;
  ctx.imageSmoothingEnabled = false;
  for (let k = 0; k < n; k++) {
    for (let p = 0; p < h * w; p++) {
      const rgb = [0, 1, 2].map((ch) => Math.round((data[k * c * h * w + (c === 3 ? ch : 0) * h * w + p] + 1) * 127.5));
      image.data.set([...rgb, 255], 4 * p);
    }
    tile.getContext("2d").putImageData(image, 0, 0);
    const r = Math.floor(k / PER_ROW), col = k % PER_ROW;
    ctx.drawImage(tile, PAD + col * (w * SCALE + PAD), PAD + r * (h * SCALE + PAD), w * SCALE, h * SCALE);
  }
}

async function main() {
  ort.env.wasm.wasmPaths = new URL("./node_modules/onnxruntime-web/dist/", location.href).href;
  ort.env.wasm.numThreads = 1;  // a static page is not cross-origin isolated: no SharedArrayBuffer threads
  const meta = await loadMetadata();
  const wanted = params.get("ep") || ("gpu" in navigator ? "webgpu" : "wasm");
  const providers = wanted === "webgpu" ? ["webgpu", "wasm"] : ["wasm"];
  const t0 = performance.now();
  const session = await ort.InferenceSession.create(graph, { executionProviders: providers });
  const loadMs = performance.now() - t0;
  $("steps").textContent = `${meta.sampler}, ${meta.steps} steps (${meta.nfe} network calls)`;
  for (const [k, name] of (meta.class_names || []).entries()) $("label").add(new Option(name, String(k)));
  if (meta.num_classes === null) $("label").disabled = true;
  if (meta.guidance) {
    $("scale-box").hidden = false;
    $("scale").value = meta.guidance_scale;
    $("scale-value").textContent = meta.guidance_scale;
    $("scale").oninput = () => ($("scale-value").textContent = $("scale").value);
    if (meta.num_classes !== null) $("label").remove(1);  // guidance needs a class: no "any"
  }
  if (params.has("seed")) $("seed").value = params.get("seed");

  async function sample() {
    const seedText = $("seed").value.trim();
    if (!/^\d+$/.test(seedText) || BigInt(seedText) >= 2n ** 63n) return status(`seed must be an integer in 0..2^63-1, got "${seedText}"`, true);
    const { n, labels } = labelsFor(meta, $("label").value);
    const feeds = {
      seed: new ort.Tensor("int64", BigInt64Array.from([BigInt(seedText)]), []),
      index: new ort.Tensor("int64", BigInt64Array.from({ length: n }, (_, i) => BigInt(i)), [n]),
    };
    if (labels) feeds.labels = new ort.Tensor("int64", BigInt64Array.from(labels, BigInt), [n]);
    if (meta.guidance) feeds.scale = new ort.Tensor("float32", Float32Array.from({ length: n }, () => Number($("scale").value)), [n]);
    status(`sampling ${n} digits…`);
    const t1 = performance.now();
    const out = (await session.run(feeds)).x0;
    const ms = performance.now() - t1;
    draw(out.data, out.dims);
    status(`${n} samples in ${(ms / 1000).toFixed(2)} s with ${providers[0]} (graph loaded in ${(loadMs / 1000).toFixed(2)} s)`);
    return { dims: out.dims, data: Array.from(out.data), ms, loadMs, provider: providers[0] };
  }

  $("sample").onclick = () => sample().catch((e) => status(String(e.message || e), true));
  const result = await sample();
  if (params.get("report") === "1")
    await fetch("/report", { method: "POST", body: JSON.stringify({ ...result, png: $("canvas").toDataURL("image/png") }) });
}

main().catch(async (e) => {
  status(String(e.message || e), true);
  if (params.get("report") === "1") await fetch("/report", { method: "POST", body: JSON.stringify({ error: String(e.message || e) }) });
});
