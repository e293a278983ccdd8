"""Hugging Face TRL's SFTTrainer, one optimizer step at a time, for benchmarks/sft_throughput.py.

`trainer.train()` owns its loop, so it runs in a thread whose callback waits before every
step until `step()` lets it go, and `step()` returns when that step has ended: the driver times
TRL's own steps (its data loading, loss, accumulation, clipping and optimizer), one at a time,
between the other configurations' turns.
"""

from __future__ import annotations

import math
import tempfile
import threading
from typing import Any

import torch


class TRLStepper:
    def __init__(self, preset: dict, model_dir: str, options: dict, batches: list, max_len: int):
        import trl
        from datasets import Dataset
        from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

        packing = options["packing"]
        rows = []
        for batch in batches:  # the same samples as every other configuration
            for ids, length, mask in zip(batch["input_ids"], batch["input_lengths"], batch["token_mask"]):
                n = int(length)
                rows.append({"input_ids": ids[:n].tolist(), "completion_mask": mask[:n].int().tolist()})
        if packing:  # rows of our packing's budget; as many per step as hold a global batch's tokens
            max_length, per_device = preset["micro_batch"] * max_len, 1
            mean_len = sum(len(r["input_ids"]) for r in rows) / len(rows)
            accumulation = max(1, math.ceil(preset["global_batch"] * mean_len / max_length))
        else:
            max_length, per_device = max_len, preset["micro_batch"]
            accumulation = preset["global_batch"] // preset["micro_batch"]
        args = trl.SFTConfig(
            output_dir=tempfile.mkdtemp(prefix="trl_bench_"),
            max_steps=10**6,  # stopped by `close`
            per_device_train_batch_size=per_device,
            gradient_accumulation_steps=accumulation,
            learning_rate=1e-5,
            weight_decay=0.0,
            lr_scheduler_type="constant",
            max_grad_norm=1.0,
            optim="adamw_torch",
            gradient_checkpointing=False,  # TRL's default is on; ours runs without it too
            max_length=max_length,
            packing=packing,
            completion_only_loss=True,
            bf16=preset["precision"] == "bfloat16",
            use_cpu=preset["device"] == "cpu",
            report_to="none",
            save_strategy="no",
            logging_strategy="no",
            eval_strategy="no",
            disable_tqdm=True,
            dataloader_num_workers=0,
            seed=0,
        )
        self._go, self._done = threading.Semaphore(0), threading.Semaphore(0)
        self._stop = False
        self._lengths: list[int] = []
        self._targets: list[int] = []
        self._error: BaseException | None = None
        stepper = self

        class Trainer(trl.SFTTrainer):
            def compute_loss(self, model, inputs, *a, **k):  # the sample lengths, for tokens and FLOPs
                if "position_ids" in inputs and "attention_mask" not in inputs:
                    position_ids = inputs["position_ids"][0]
                    starts = (position_ids == 0).nonzero().flatten().tolist() + [position_ids.shape[0]]
                    stepper._lengths.extend(b - a for a, b in zip(starts, starts[1:]))
                else:
                    stepper._lengths.extend(inputs["attention_mask"].sum(dim=1).tolist())
                stepper._targets.append(int((inputs["labels"] != -100).sum()))
                return super().compute_loss(model, inputs, *a, **k)

        class Gate(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                stepper._go.acquire()
                if stepper._stop:
                    control.should_training_stop = True

            def on_step_end(self, args, state, control, **kwargs):
                if preset["device"] == "cuda":
                    torch.cuda.synchronize()
                if stepper._stop:
                    control.should_training_stop = True
                stepper._done.release()

        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.trainer = Trainer(
            model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer, callbacks=[Gate()]
        )
        self._thread = threading.Thread(target=self._train, daemon=True)
        self._thread.start()

    def _train(self) -> None:
        try:
            self.trainer.train()
        except BaseException as e:  # handed to the caller of `step`
            self._error = e
            self._done.release()

    def step(self, batch: Any) -> dict:
        """One TRL optimizer step on its own data loader's next batch (`batch` is not used)."""
        self._lengths.clear()
        self._targets.clear()
        self._go.release()
        self._done.acquire()
        if self._error is not None:
            raise self._error
        return {"num_tokens": sum(self._lengths), "num_valid_tokens": sum(self._targets), "lengths": list(self._lengths)}

    def close(self) -> None:
        self._stop = True
        self._go.release()
        self._thread.join(timeout=60)
