"""Loads compressed-tensors exports with transformers and the compressed-tensors package alone, in a process that
never imports hf_oscq, and reports what it computed. Started by tests/export/test_compressed_tensors.py:

    python tests/_ct_loader.py CASES.json RESULTS.json THREADS

Each case names a folder, its Auto class and a safetensors file of inputs (`input_ids` or `pixel_values`); the loader
writes the logits of each case, the modules compressed-tensors quantized on load, greedy `generate` tokens and
`pipeline` outputs where asked, and whether any hf_oscq module was imported (the test fails if one was).
"""

import json
import sys
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file, save_file


def main() -> None:
    cases = json.loads(Path(sys.argv[1]).read_text())
    output = Path(sys.argv[2])
    torch.set_num_threads(int(sys.argv[3]))  # the test process's count: the same reduction order as its logits
    results, logits = {}, {}
    for case in cases:
        name, folder = case["name"], case["folder"]
        model = getattr(transformers, case["auto_class"]).from_pretrained(folder).eval()
        inputs = load_file(case["inputs"])
        with torch.no_grad():
            logits[name] = model(**inputs).logits.contiguous()
        result = {
            "quantized_modules": sorted(
                module_name
                for module_name, module in model.named_modules()
                if getattr(module, "quantization_scheme", None) is not None
            ),
        }
        if case.get("generate"):
            generated = model.generate(inputs["input_ids"], max_new_tokens=case["generate"], do_sample=False)
            result["generated"] = generated[0].tolist()
        if case.get("pipeline") == "text-generation":
            generator = transformers.pipeline("text-generation", model=folder)
            text = generator(case["prompt"], max_new_tokens=case["generate"], do_sample=False)
            result["pipeline"] = text[0]["generated_text"]
        if case.get("pipeline") == "image-classification":
            from PIL import Image

            classify = transformers.pipeline("image-classification", model=folder)
            result["pipeline"] = classify(Image.open(case["image"]), top_k=3)
        results[name] = result
    save_file(logits, str(output.with_suffix(".safetensors")))
    results["hf_oscq_modules"] = sorted(name for name in sys.modules if name.split(".")[0] == "hf_oscq")
    output.write_text(json.dumps(results))
    assert not results["hf_oscq_modules"], results["hf_oscq_modules"]


if __name__ == "__main__":
    main()
