// Times a seed-only sampler graph in onnxruntime-node: session load, then `rounds` runs at batch B.
//   node bench/js/bench_node.mjs GRAPH.onnx BATCH ROUNDS  → one JSON line {load_s, run_s: [...]}
import { readFileSync } from "node:fs";
import { createRequire } from "node:module";
import { feeds as makeFeeds } from "./feeds.mjs";

const require = createRequire(new URL("../../examples/onnx-node/package.json", import.meta.url));
const ort = require("onnxruntime-node");
const [graph, batchText, roundsText, threadsText] = process.argv.slice(2);
const meta = JSON.parse(readFileSync(`${graph}.json`, "utf8"));
const B = Number(batchText), rounds = Number(roundsText);
const t0 = performance.now();
const session = await ort.InferenceSession.create(graph, { intraOpNumThreads: Number(threadsText || 2), interOpNumThreads: 1 });
const load = (performance.now() - t0) / 1000;
const feeds = makeFeeds(ort, meta, B);
await session.run(feeds);  // warm-up
const times = [];
for (let r = 0; r < rounds; r++) {
  const t = performance.now();
  await session.run(feeds);
  times.push((performance.now() - t) / 1000);
}
console.log(JSON.stringify({ load_s: load, run_s: times }));
