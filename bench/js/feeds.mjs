// The inputs of a seed-only sampler graph for a timing run (Node and browser share this module):
// seed 0, samples 0..B-1, labels i mod 10, the graph's default guidance scale.
export function feeds(ort, meta, B) {
  const out = {
    seed: new ort.Tensor("int64", BigInt64Array.from([0n]), []),
    index: new ort.Tensor("int64", BigInt64Array.from({ length: B }, (_, i) => BigInt(i)), [B]),
  };
  if (meta.inputs.includes("labels")) out.labels = new ort.Tensor("int64", BigInt64Array.from({ length: B }, (_, i) => BigInt(i % 10)), [B]);
  if (meta.inputs.includes("scale")) out.scale = new ort.Tensor("float32", Float32Array.from({ length: B }, () => meta.guidance_scale), [B]);
  return out;
}
