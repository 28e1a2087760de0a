#!/usr/bin/env node
// Sample digits from a sampler graph written by `toolkit export onnx` (the default seed-only graph) with
// onnxruntime-node, and write a PNG grid. The same seed gives the same digits as `toolkit compose --seed`.
//
//   node sample.mjs sampler.onnx --class 7 -n 16 --seed 0 --out digits.png [--json samples.json]
//
// Every bad input is one line `error: ...` on stderr and exit status 2.
import { readFileSync, writeFileSync, existsSync, renameSync } from "node:fs";
import { deflateSync } from "node:zlib";
import ort from "onnxruntime-node";

class UsageError extends Error {}

function parseArgs(argv) {
  const args = { graph: null, label: null, scale: null, n: 16, seed: 0n, out: "digits.png", json: null };
  const integer = (name, text, lo, hi) => {
    if (!/^-?\d+$/.test(text ?? "")) throw new UsageError(`${name} must be an integer, got ${JSON.stringify(text)}`);
    const v = BigInt(text);
    if (v < BigInt(lo) || v > BigInt(hi)) throw new UsageError(`${name} must lie in ${lo}..${hi}, got ${text}`);
    return v;
  };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    const next = () => {
      if (i + 1 >= argv.length) throw new UsageError(`${a} needs a value`);
      return argv[++i];
    };
    if (a === "--class") args.label = Number(integer("--class", next(), -(2 ** 31), 2 ** 31));
    else if (a === "--scale") {
      const text = next();
      args.scale = Number(text);
      if (!/^[0-9.eE+-]+$/.test(text) || !Number.isFinite(args.scale) || args.scale < 0)
        throw new UsageError(`--scale must be a finite number >= 0, got ${text}`);
    } else if (a === "-n") args.n = Number(integer("-n", next(), 1, 4096));
    else if (a === "--seed") args.seed = integer("--seed", next(), 0, "9223372036854775807");
    else if (a === "--out") args.out = next();
    else if (a === "--json") args.json = next();
    else if (a.startsWith("-")) throw new UsageError(`unknown option ${a}`);
    else if (args.graph === null) args.graph = a;
    else throw new UsageError(`unexpected argument ${a}`);
  }
  if (args.graph === null) throw new UsageError("usage: node sample.mjs GRAPH.onnx [--class K] [-n N] [--seed S] [--out PNG]");
  return args;
}

/** Every metadata value of a toolkit graph is JSON; onnxruntime's JavaScript API cannot read metadata_props,
 * so the exporter writes the same object beside the graph as GRAPH.onnx.json. */
function readMetadata(graph) {
  const file = `${graph}.json`;
  if (!existsSync(file)) throw new UsageError(`${file} is missing (toolkit export onnx writes it beside the graph)`);
  let meta;
  try {
    meta = JSON.parse(readFileSync(file, "utf8"));
  } catch (e) {
    throw new UsageError(`${file} is not JSON (${e.message})`);
  }
  if (meta.kind !== "diffusion-toolkit-sampler" || !(meta.metadata_version >= 2))
    throw new UsageError(`${file} does not describe a diffusion-toolkit sampler graph`);
  return meta;
}

function crc32(buf) {
  let c, crc = 0xffffffff;
  for (let n = 0; n < buf.length; n++) {
    c = (crc ^ buf[n]) & 0xff;
    for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
    crc = (crc >>> 8) ^ c;
  }
  return (crc ^ 0xffffffff) >>> 0;
}

function png(width, height, gray) {
  const chunk = (type, data) => {
    const len = Buffer.alloc(4); len.writeUInt32BE(data.length);
    const body = Buffer.concat([Buffer.from(type, "ascii"), data]);
    const crc = Buffer.alloc(4); crc.writeUInt32BE(crc32(body));
    return Buffer.concat([len, body, crc]);
  };
  const ihdr = Buffer.alloc(13);
  ihdr.writeUInt32BE(width, 0); ihdr.writeUInt32BE(height, 4); ihdr[8] = 8; ihdr[9] = 0;
  const raw = Buffer.alloc((width + 1) * height);
  for (let y = 0; y < height; y++) gray.copy(raw, y * (width + 1) + 1, y * width, (y + 1) * width);
  return Buffer.concat([Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]), chunk("IHDR", ihdr),
                        chunk("IDAT", deflateSync(raw)), chunk("IEND", Buffer.alloc(0))]);
}

/** [N, 1, H, W] in [-1, 1] → a grid 8 samples wide, each enlarged 4×, 1 pixel apart. */
function grid(data, n, h, w, scale = 4, pad = 1) {
  const cols = Math.min(8, n), rows = Math.ceil(n / cols);
  const W = cols * (w * scale + pad) + pad, H = rows * (h * scale + pad) + pad;
  const img = Buffer.alloc(W * H);
  for (let k = 0; k < n; k++) {
    const r = Math.floor(k / cols), c = k % cols;
    for (let y = 0; y < h * scale; y++)
      for (let x = 0; x < w * scale; x++) {
        const v = data[k * h * w + Math.floor(y / scale) * w + Math.floor(x / scale)];
        img[(pad + r * (h * scale + pad) + y) * W + pad + c * (w * scale + pad) + x] = Math.round((v + 1) * 127.5);
      }
  }
  return { W, H, img };
}

async function main() {
  const args = parseArgs(process.argv.slice(2));
  const meta = readMetadata(args.graph);
  if (!meta.inputs.includes("seed")) throw new UsageError("this graph takes its noise as inputs; export it with the default --noise seed");
  const K = meta.num_classes;
  if (args.label !== null && (K === null || args.label < 0 || args.label >= K))
    throw new UsageError(K === null ? "--class given but the graph's model is unconditional" : `--class must lie in 0..${K - 1}, got ${args.label}`);
  let session;
  try {
    session = await ort.InferenceSession.create(args.graph, { logSeverityLevel: 4 });
  } catch (e) {
    throw new UsageError(`${args.graph} is not a loadable ONNX graph (${String(e.message).split("\n")[0].slice(0, 200)})`);
  }
  const n = args.n;
  const feeds = {
    seed: new ort.Tensor("int64", BigInt64Array.from([args.seed]), []),
    index: new ort.Tensor("int64", BigInt64Array.from({ length: n }, (_, i) => BigInt(i)), [n]),
  };
  if (meta.inputs.includes("labels")) {
    if (args.label === null && meta.guidance) throw new UsageError(`the graph's ${meta.guidance} guidance needs --class`);
    const label = BigInt(args.label === null ? K : args.label);  // K: the null label, any digit
    feeds.labels = new ort.Tensor("int64", BigInt64Array.from({ length: n }, () => label), [n]);
  }
  if (meta.inputs.includes("scale")) {
    const s = args.scale ?? meta.guidance_scale;
    feeds.scale = new ort.Tensor("float32", Float32Array.from({ length: n }, () => s), [n]);
  } else if (args.scale !== null) throw new UsageError("--scale needs a guided graph");
  let out;
  try {
    out = (await session.run(feeds)).x0;
  } catch (e) {
    const text = String(e.message);
    const m = text.match(/input check failed: ([^']*)/);
    throw new UsageError(m ? m[1] : text.split("\n")[0].slice(0, 200));
  }
  const [, , h, w] = out.dims;
  const { W, H, img } = grid(out.data, n, h, w);
  writeFileSync(`${args.out}.tmp`, png(W, H, img));
  renameSync(`${args.out}.tmp`, args.out);
  if (args.json) writeFileSync(args.json, JSON.stringify({ dims: out.dims, data: Array.from(out.data) }));
  console.log(`wrote ${args.out} (${n} samples, ${meta.sampler} ${meta.steps} steps, seed ${args.seed}, onnxruntime-node)`);
}

main().catch((e) => {
  console.error(`error: ${e instanceof UsageError ? e.message : `internal error: ${String(e.message).split("\n")[0]}`}`);
  process.exit(e instanceof UsageError ? 2 : 1);
});
