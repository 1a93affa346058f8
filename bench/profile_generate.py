"""What the app's "Try" costs on a GPU: greedy generation on a Llama-2-7B-shaped NF4 model cut to a few layers, loaded
through load_model as the app loads it, with SDPA free to pick cuDNN's attention and with cuDNN's left out.

Generation grows the key/value length by one each token, so if SDPA picks cuDNN's attention, which plans its kernels
anew for each sequence length, every new token could pay a plan. Each variant runs in a fresh process (cuDNN keeps its
plans for the process), generating from the same prompt twice: the first pass meets every length for the first time,
the second meets them again.
Usage: python bench/profile_generate.py --layers 8 --new-tokens 64 [--no-cudnn-attention]
"""
import argparse
import contextlib
import json
import time

import torch

from common import add_output_args, make_model_dir, save_result, work_dir
from frugal_loraga import Config
from frugal_loraga.blocks import without_cudnn_attention
from frugal_loraga.models import load_model


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=40)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--no-cudnn-attention", action="store_true")
    add_output_args(parser, "profile_generate", work="/tmp/bench7b")
    args = parser.parse_args()
    model_dir = make_model_dir(work_dir(args.work) / f"llama7b_{args.layers}layers", args.layers)
    model, tokenizer, device = load_model(Config(model=str(model_dir), data="unused"))
    prompt = torch.randint(100, 30000, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(0)).to(device)
    passes = []
    with without_cudnn_attention() if args.no_cudnn_attention else contextlib.nullcontext():
        for _ in range(2):
            torch.cuda.synchronize()
            start = time.perf_counter()
            with torch.no_grad():
                out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                     max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                     pad_token_id=tokenizer.pad_token_id)
            torch.cuda.synchronize()
            passes.append(time.perf_counter() - start)
    result = {"device": torch.cuda.get_device_name(), "layers": args.layers, "prompt_tokens": args.prompt_tokens,
              "new_tokens": out.shape[1] - args.prompt_tokens, "cudnn_attention": not args.no_cudnn_attention,
              "seconds_first_pass": passes[0], "seconds_second_pass": passes[1],
              "ms_per_token_first_pass": 1000 * passes[0] / args.new_tokens,
              "ms_per_token_second_pass": 1000 * passes[1] / args.new_tokens}
    print(json.dumps(result), flush=True)
    save_result(args.name, result)


if __name__ == "__main__":
    main()
