"""The mutations of ../shared/tools/mutate_moelora.py whose text the batched losses rewrote, in today's words, and
those of the behaviour that came with them; then the promises a run keeps about a user's work (runs.py, train.py)
and about its gradients under --fsdp.
Each one breaks a file in a copy of the project and runs its tests; a mutation that no test notices survives.
Run from the project's root (with MOELORA_SHARED set, as tests/README.md says):

    python tests/mutate_more.py
"""
import os
import shutil
import subprocess
import sys
import tempfile

MUTATIONS = [  # (what it breaks, text in moelora.py, replacement)
    ("an anchor counted as its own positive",  # mutate_moelora.py's 5
     "pos = (labels.unsqueeze(-1) == labels.unsqueeze(-2)) & ~self_mask", "pos = (labels.unsqueeze(-1) == labels.unsqueeze(-2))"),
    ("contrastive temperature ignored",  # 6
     "sim = dots / (norms.unsqueeze(-1) * norms.unsqueeze(-2) * temperature)", "sim = dots / (norms.unsqueeze(-1) * norms.unsqueeze(-2))"),
    ("balance loss without its factor N", "return num_experts * (f * P).sum(dim=-1)", "return (f * P).sum(dim=-1)"),  # 8
    ("padding counted in the balance loss",  # 10
     "balance_loss(logits, top, cfg.num_experts, real)", "balance_loss(logits, top, cfg.num_experts, None)"),
    ("aux losses summed over layers instead of averaged", "torch.cat(values).mean() if values", "torch.cat(values).sum() if values"),
    ("checkpoint rerun keeps its loss inputs",  # 14
     "if not rerun:\n                self._loss_inputs = _LossInputs(", "if True:\n                self._loss_inputs = _LossInputs("),
    ("contrastive pairs drawn again by every layer",
     'self._drew_pairs = self._pairs.get("key") != (M, k, S)', "self._drew_pairs = True"),
    ("the layer that drew the pairs does not draw again in a checkpointing rerun",
     "            if self._drew_pairs:\n                _draw_pairs(M, k, S, real, self.lora_A.device)\n", ""),
    ("the Gram matrices stacked in another order than the codes",
     "for width in sorted({i.B_all.shape[0] for i in inputs})", "for width in sorted({i.B_all.shape[0] for i in inputs}, reverse=True)"),
    ("the aux losses read lora_B after the forward (FSDP holds only a shard of it then)",
     "_gram(torch.stack([i.B_all for i in inputs if i.B_all.shape[0] == width]))",
     "_gram(_side_by_side(torch.stack([g.lora_B for g in group if g.out_features == width])))"),
    ("padding's sampled pairs counted in the contrastive loss", "_stacked_masks([i.codes_real for i in inputs]))", "None)"),
    ("the router frozen by mark_only_moelora_as_trainable",  # 13, whose text _adapter_parameters rewrote
     '("lora_A", "lora_B", "router")', '("lora_A", "lora_B")'),
    ("Switch's gate renormalised over the k kept experts",
     "top_gates, top_idx = logits.float().softmax(dim=-1).topk(cfg.top_k, dim=-1)",
     "top_gates, top_idx = logits.float().softmax(dim=-1).topk(cfg.top_k, dim=-1); top_gates = top_gates / top_gates.sum(-1, keepdim=True)"),
    ("top-1 with Mixtral's gate accepted", 'not (self.top_k == 1 and self.num_experts > 1 and self.gate == "mixtral")', "True"),
    ("router jitter in eval mode too", "if self.training and cfg.router_jitter > 0:", "if cfg.router_jitter > 0:"),
    ("router jitter twice as wide", "uniform_(1.0 - cfg.router_jitter, 1.0 + cfg.router_jitter)",
     "uniform_(1.0 - 2 * cfg.router_jitter, 1.0 + 2 * cfg.router_jitter)"),
    ("router z-loss without its square", "_token_mean(lse.square(), real)", "_token_mean(lse.abs(), real)"),
    ("padding counted in the router z-loss", "router_z_loss(logits, real))", "router_z_loss(logits, None))"),
    ("router z-loss weight ignored", "cfg.router_z_weight * router_z_loss(", "router_z_loss("),
    ("contrastive_scale ignored", "cfg.contrastive_weight * contrastive_scale * loss", "cfg.contrastive_weight * loss"),
    ("an older adapter file's missing fields not defaulted", "saved = {**asdict(MoELoRAConfig()), **saved,", "saved = {**saved,"),
    ("a quantised base's output replaced by zeros",
     "F.linear(x, self.weight, self.bias) if self.base_layer is None else self.base_layer(x)",
     "F.linear(x, self.weight, self.bias) if self.base_layer is None else x.new_zeros(*x.shape[:-1], self.out_features)"),
]
TESTS = ["tests/test_moelora.py", "tests/test_other_models.py", "tests/test_quantize.py"]
RUN_TESTS = ["tests/test_train.py", "tests/test_fsdp.py", "-k",
             "overwrite or run_json or resume_takes or validation_loss or another_config or reduced_on"]
RUN_MUTATIONS = [  # (file, what it breaks, text, replacement)
    ("runs.py", "--overwrite deletes the earlier run instead of moving it",
     "os.replace(f, aside / f.name)", "shutil.rmtree(f) if f.is_dir() else f.unlink()"),
    ("train.py", "out_dir prepared before the data and batch checks",
     "    check_out_dir(args, run)  #", "    check_out_dir(args, run); prepare_out_dir(args, run, {'run_id': 0})  #"),
    ("train.py", "best/ replaced by a worse checkpoint", "if checked and val_loss < best:", "if checked:"),
    ("data/training.py", "the held-out slice depends on --seed", "generator=torch.Generator().manual_seed(0)",
     "generator=torch.Generator().manual_seed(args.seed)"),
    ("runs.py", "--resume takes nothing from the run", "        values[key] = theirs\n", "        pass\n"),
    ("runs.py", "--resume does not check the training data", "if args.resume and then[\"sha256\"] != now[\"sha256\"]:",
     "if False:"),
    ("train.py", "gradients reduced over processes on every micro-batch", "model.set_requires_gradient_sync(sync)",
     "model.set_requires_gradient_sync(True)"),
    ("runs.py", "a saved run opens on another base unchecked",
     "        check_base(saved.fingerprint, fingerprint, saved.checkpoint, path, saved.base)\n", ""),
]


def main():
    survived = []
    todo = [("moelora.py", what, old, new, TESTS) for what, old, new in MUTATIONS]
    todo += [(file, what, old, new, RUN_TESTS) for file, what, old, new in RUN_MUTATIONS]
    for i, (file, what, old, new, tests) in enumerate(todo, 1):
        src = open(file).read()
        if src.count(old) != 1:
            print(f"{i:2d}. not applicable (text not found): {what}")
            continue
        work = tempfile.mkdtemp(prefix="mutate_")
        try:
            shutil.copytree(".", os.path.join(work, "p"), ignore=shutil.ignore_patterns("out*", ".git", "__pycache__"))
            with open(os.path.join(work, "p", file), "w") as f:
                f.write(src.replace(old, new))
            code = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", *tests], cwd=os.path.join(work, "p"),
                                  capture_output=True).returncode
        finally:
            shutil.rmtree(work)
        print(f"{i:2d}. {'killed  ' if code else 'SURVIVED'} {what}", flush=True)
        if not code:
            survived.append(what)
    print(f"survivors: {len(survived)}" + "".join(f"\n  {w}" for w in survived))
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
