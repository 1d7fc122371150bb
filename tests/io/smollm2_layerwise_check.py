"""SmolLM2: the streamed calibrated quantization (lowbit quantize) against the in-memory
``lowbit.quantize_`` with the same calibration ids. A check to run by hand (minutes to tens
of minutes on a CPU), not collected by pytest; its results are in docs/perf/quantize.md.

    PYTHONPATH=src python tests/io/smollm2_layerwise_check.py WORKDIR \\
        a16w4-mxfp4-rot,a16w4-int-g64-gptq,a16w4-int-g64-awq 8 256

It writes the bundled SmolLM2-135M-Instruct (float32, dequantized from its GGUF Q4_1) as a
Hugging Face safetensors directory in WORKDIR/smollm2-hf (once), takes N sequences of LEN
tokens from the calibration half of pydoc_data.topics, and for each recipe prints one JSON
line: how many state-dict tensors differ between the streamed checkpoint (read back with
lowbit.load) and the in-memory model, whether the logits on 4 x 256 evaluation tokens are
equal, and both wall times.
"""

import json
import os
import sys
import time

import torch


def main(work: str, recipes: str, n: int, length: int) -> None:
    import transformers

    import lowbit
    from lowbit.eval.corpus import token_sequences, topics_split
    from lowbit.io.streaming import quantize_checkpoint
    from lowbit.nn import quantize_
    from lowbit.quant.calibration import calibration_ids

    hf = os.path.join(work, "smollm2-hf")
    if not os.path.exists(os.path.join(hf, "config.json")):
        from safetensors.torch import save_file

        from lowbit.eval.models import load_model

        bm = load_model("smollm2")  # transformers refuses save_pretrained of a GGUF-loaded model: write it by hand
        os.makedirs(hf, exist_ok=True)
        sd = {k: v.contiguous() for k, v in bm.model.state_dict().items()}
        if bm.model.config.tie_word_embeddings:
            sd.pop("lm_head.weight", None)
        save_file(sd, os.path.join(hf, "model.safetensors"), metadata={"format": "pt"})
        c = bm.model.config.to_dict()
        c.pop("quantization_config", None)
        c["dtype"] = "float32"
        with open(os.path.join(hf, "config.json"), "w") as f:
            json.dump(c, f, indent=1)
        bm.tokenizer.save_pretrained(hf)
    tok = transformers.AutoTokenizer.from_pretrained(hf)
    cal_text, eval_text = topics_split()
    ids = calibration_ids(tok, cal_text, n_seqs=n, seq_len=length)
    ev = token_sequences(tok, eval_text, n_tokens=1024, seq_len=256)
    for recipe in recipes.split(","):
        out = os.path.join(work, f"smollm2-{recipe}")
        t = time.time()
        res = quantize_checkpoint(hf, out, recipe, calibration=ids, progress=False, restart=True)
        t_stream = time.time() - t
        t = time.time()
        ref = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
        quantize_(ref, recipe, calibration=ids, progress=False)
        t_memory = time.time() - t
        got = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
        lowbit.load(out, got)
        a, b = ref.state_dict(), got.state_dict()
        differ = [k for k in a if k not in b or not torch.equal(a[k], b[k])]
        with torch.no_grad():
            la = torch.cat([ref(ev[i:i + 2]).logits for i in range(0, len(ev), 2)])
            lb = torch.cat([got(ev[i:i + 2]).logits for i in range(0, len(ev), 2)])
        print(json.dumps(dict(recipe=recipe, tensors=len(a), n_differ=len(differ), differ=differ[:5],
                              logits_equal=bool(torch.equal(la, lb)), max_abs=float((la - lb).abs().max()),
                              stream_s=round(t_stream, 1), memory_s=round(t_memory, 1), notes=res.notes)), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
