"""Merge while training: a `transformers.Trainer` run with `BOMergeCallback`, offline.

The demo's tiny GPT-NeoX (its step400 checkpoint) goes on training, at a constant learning rate, on Python code it has
never seen; every second save starts, in a child process on CPU, the GP-searched merge of the last 3 checkpoints,
scored on a held-out slice of that code. Training does not wait for it; the finished rounds show in the Trainer's logs
as `bomerge/loss` and `bomerge/gain_vs_latest` (and in TensorBoard/W&B with `report_to`).

Needs: ~2 GB RAM, about 3 minutes on 2 CPU cores: 1 of training, then the queued merges (the demo trajectory is built
on first use, then cached). Measured: each merge beat the latest checkpoint, by 0.02-0.10 nats. Run: python
examples/trainer_callback.py [OUTPUT_DIR] (default ./trainer-callback-run) Then: trainer-callback-
run/bomerge/watch.png (the curves), watch.jsonl (one line per round), checkpoint-N/ (the merged models, with their
cards)."""

import json
import sys
from pathlib import Path

import torch
from datasets import Dataset
from transformers import AutoTokenizer, GPTNeoXForCausalLM, Trainer, TrainingArguments, default_data_collator

from hf_bomerge.demo import build_trajectory
from hf_bomerge.integrations import BOMergeCallback


def main(output_dir: str) -> None:
    demo = build_trajectory()  # the config, tokenizer and held-out texts we reuse
    tokenizer = AutoTokenizer.from_pretrained(demo / "step400")
    model = GPTNeoXForCausalLM.from_pretrained(demo / "step400", dtype=torch.float32)

    texts = [json.loads(line)["text"] for line in open(demo / "heldout" / "validation.jsonl")]
    cut = len(texts) * 4 // 5  # train on 80% of the files, score the merges on the other 20%
    ids = tokenizer("\n\n".join(texts[:cut]))["input_ids"]
    blocks = [ids[i:i + 128] for i in range(0, len(ids) - 128, 128)]
    train = Dataset.from_dict({"input_ids": blocks, "labels": blocks})
    heldout = Path(output_dir) / "heldout.jsonl"
    heldout.parent.mkdir(parents=True, exist_ok=True)
    heldout.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[cut:]))

    args = TrainingArguments(output_dir=output_dir, max_steps=40, save_steps=5, logging_steps=10,
                             per_device_train_batch_size=8, learning_rate=6e-3, lr_scheduler_type="constant",
                             report_to=[], use_cpu=True, seed=0, save_only_model=True)
    trainer = Trainer(model=model, args=args, train_dataset=train, processing_class=tokenizer,
                      data_collator=default_data_collator)
    # The held-out set of the merges: any text file or Hub dataset (`dataset_config=`, `split=` as for a run).
    trainer.add_callback(BOMergeCallback(trainer, every=2, window=3, trials=10, dataset=str(heldout),
                                         max_eval_tokens=4096))
    trainer.train()

    print(f"{'step':>6}  {'latest':>9}  {'merge':>9}  {'gain':>8}")
    for h in trainer.state.log_history:
        if "bomerge/loss" in h:
            print(f"{h['bomerge/checkpoint_step']:>6.0f}  {h['bomerge/latest_loss']:9.4f}  "
                  f"{h['bomerge/loss']:9.4f}  {h['bomerge/gain_vs_latest']:+8.4f}")
    print(f"curves: {output_dir}/bomerge/watch.png")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "trainer-callback-run")
