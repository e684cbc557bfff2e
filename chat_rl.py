"""
chat_rl.py: reinforcement learning on tasks whose answers can be checked (GRPO-style, on-policy).

  python chat_rl.py --task toy --num-steps 60 --prompts-per-step 8 --samples-per-prompt 8   # CPU, minutes
  torchrun --standalone --nproc_per_node=8 chat_rl.py --task gsm8k                          # GSM8K, 8 GPUs

Each step takes --prompts-per-step training questions (split over the ranks), samples
--samples-per-prompt completions of each through engine.Engine with the python tool on, grades each
completion with the task (1 right, 0 wrong), and pushes up the log-probability of the tokens of
completions that did better than their group, down for those that did worse:

    advantage_i = reward_i - mean(rewards of its group)          (not divided by the std: advantages())
    loss = -sum over sampled tokens t of advantage(t) * log p(t) / (sampled tokens in the whole step)

Prompt tokens and the tool outputs the engine forces into the stream carry no loss (the engine's
masks). This is REINFORCE with a per-group baseline, as nanochat's chat_rl.py: no KL penalty and no
ratio clipping, because each batch is used for exactly one update right after it was sampled, so the
importance ratio would always be 1. Held-out pass@1 / pass@k every --eval-every steps; checkpoints
in $SPEEDCHAT_HOME/checkpoints/rl/<tag> (--resume continues one exactly), a log.jsonl beside them,
and the "rl" section of the report card.
"""
import argparse, random, time
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist

import tok, train, engine, evals
from train import print0

# --task -> (task of a split, default --max-new-tokens, default --eval-examples)
TASKS = {
    "gsm8k": (lambda split: evals.GSM8K("main", split), 256, 400),
    "toy": (lambda split: evals.ToyMath(split), 64, 200),  # offline arithmetic word problems with the calculator
}


# ----------------------------------------------------------------------------- the math

def advantages(rewards) -> torch.Tensor:
    """Reward minus the group's mean reward. Not divided by the group's std (GRPO does, nanochat and
    Dr. GRPO (Liu et al. 2025) do not): with 0/1 rewards the std is small exactly when the model is
    nearly always right or nearly always wrong, so dividing would push 1-right-in-16 questions ~4x
    harder than half-right ones, weighting questions by the model's certainty and amplifying noise.
    A group with equal rewards gets advantage 0 either way: nothing to learn from it."""
    r = torch.as_tensor(rewards, dtype=torch.float32)
    return r - r.mean()


def sampled_logprobs(model, seqs, masks, device) -> torch.Tensor:
    """(rows,) the sum of log p(token) over the *sampled* tokens of each row (mask 1). Prompt tokens,
    tool outputs forced by the engine (mask 0) and padding get target -1, which the model's
    cross-entropy ignores (contributes exactly 0, and no gradient)."""
    T = max(len(s) for s in seqs) - 1
    x = torch.zeros(len(seqs), T, dtype=torch.long)
    y = torch.full((len(seqs), T), -1, dtype=torch.long)
    for i, (s, m) in enumerate(zip(seqs, masks)):
        s, m = torch.tensor(s), torch.tensor(m, dtype=torch.bool)
        x[i, :len(s) - 1] = s[:-1]
        y[i, :len(s) - 1] = torch.where(m[1:], s[1:], -1)  # mask[t] says whether token t was sampled
    with train.autocast(device):
        nll = model(x.to(device), y.to(device), loss_reduction="none")  # (rows, T), 0 where ignored
    return -nll.float().sum(dim=1)


def pg_backward(model, seqs, masks, adv, num_tokens, device, batch_rows=8, scale=1.0) -> float:
    """Accumulate the gradient of -sum(adv_i * logp_i) / num_tokens, batch_rows rows per forward.
    Rows with advantage 0 add nothing to it, so they are skipped (no forward at all). scale: the world
    size, since the optimizer averages gradients over ranks and we want the sum. Returns the loss."""
    keep = [i for i in range(len(seqs)) if adv[i] != 0]
    total = 0.0
    for b in range(0, len(keep), batch_rows):
        rows = keep[b:b + batch_rows]
        logp = sampled_logprobs(model, [seqs[i] for i in rows], [masks[i] for i in rows], device)
        loss = -(logp * adv[rows].to(device)).sum() / num_tokens
        (loss * scale).backward()
        total += loss.item()
    return total


# ----------------------------------------------------------------------------- sampling and grading

def rollouts(eng, task, items, num_samples, max_new_tokens, temperature, top_k, seeds) -> list:
    """num_samples completions of each item, every prompt in one batched pass (item i's samples drawn
    from seeds[i], whatever else is in the batch): (seqs, masks, rewards) per item, None for one
    whose prompt does not fit."""
    tokenizer = eng.tokenizer
    prompts = [tokenizer.render_for_completion(item["messages"]) for item in items]
    fits = []
    for p in prompts:
        try:
            fits.append(eng.budget(p, max_new_tokens) > 0)
        except ValueError as e:  # longer than the context: skip it rather than crash a long run
            print0(f"skipped a prompt: {e}")
            fits.append(False)
    kept = [i for i, ok in enumerate(fits) if ok]
    outs = iter(engine.generate_all(eng, [prompts[i] for i in kept], num_samples, max_tokens=max_new_tokens,
                                    temperature=temperature, top_k=top_k, seed=[seeds[i] for i in kept]))
    groups = []
    for item, p, ok in zip(items, prompts, fits):
        if not ok:
            groups.append(None)
            continue
        seqs, masks = next(outs)
        groups.append((seqs, masks, [float(task.reward(item, engine.completion_text(tokenizer, s[len(p):]))) for s in seqs]))
    return groups


@torch.no_grad()
def evaluate_pass(eng, task, num_samples, max_new_tokens, temperature, top_k, device, seed=0):
    """(pass@1, pass@k) on a held-out task view, k = num_samples samples per item. pass@1 is the mean
    reward (the unbiased estimate from k samples), pass@k the fraction of items with one right.
    Ranks take every world-th item; the sums are all-reduced."""
    rank, ws = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # pass@1 sum, pass@k sum, items
    mine = range(rank, len(task), ws)
    for out in rollouts(eng, task, [task[i] for i in mine], num_samples, max_new_tokens, temperature, top_k,
                        [seed + i for i in mine]):
        rewards = out[2] if out else [0.0]  # a prompt that does not fit is a miss
        sums += torch.tensor([sum(rewards) / len(rewards), max(rewards), 1.0], dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(sums)
    return float(sums[0] / sums[2].clamp(min=1)), float(sums[1] / sums[2].clamp(min=1))


def prompt_index(step: int, j: int, per_step: int, n: int, seed: int) -> int:
    """Training item of prompt j of a step: a fresh seeded shuffle each epoch. A pure function of the
    step, so a resumed run sees exactly the prompts the uninterrupted one would have."""
    g = step * per_step + j
    order = list(range(n))
    random.Random(seed * 1_000_003 + g // n).shuffle(order)
    return order[g % n]


# ----------------------------------------------------------------------------- one step

def sample_groups(model, eng, task, step, args, max_new_tokens, rank, ws) -> list:
    """1) This rank's share of the step's prompts (every ws-th), args.samples_per_prompt graded
    completions of each: a list of (seqs, masks, rewards). The seeds depend on the step and the
    prompt only, so any number of ranks, and a resumed run, draw the same samples."""
    model.eval()
    mine = range(rank, args.prompts_per_step, ws)
    items = [task[prompt_index(step, j, args.prompts_per_step, len(task), args.seed)] for j in mine]
    groups = rollouts(eng, task, items, args.samples_per_prompt, max_new_tokens, args.temperature, args.top_k,
                      [args.seed * 1_000_003 + step * args.prompts_per_step + j for j in mine])
    model.train()
    return [g for g in groups if g is not None]


def step_totals(groups, device, ws):
    """(sampled tokens, reward sum, samples, groups with equal rewards) of the whole step, all ranks.
    The tokens are the loss's normalizer: summed over ranks, so every token weighs the same."""
    stats = torch.tensor([sum(sum(m) for g in groups for m in g[1]), sum(sum(g[2]) for g in groups),
                          sum(len(g[2]) for g in groups), sum(min(g[2]) == max(g[2]) for g in groups)],
                         dtype=torch.float64, device=device)
    if ws > 1:
        dist.all_reduce(stats)
    return stats.tolist()


def policy_update(model, optimizer, groups, num_tokens, lrm, step, batch_rows, device, ws) -> float:
    """2) One policy-gradient step on this rank's groups at learning-rate multiplier lrm; returns the
    step's loss, summed over ranks."""
    train.set_schedule(optimizer, lrm, train.muon_momentum(step))
    loss = torch.zeros((), dtype=torch.float64, device=device)
    for seqs, masks, r in groups:
        loss += pg_backward(model, seqs, masks, advantages(r), max(num_tokens, 1.0), device, batch_rows, ws)
    optimizer.step()  # averages the gradients over ranks (reduce-scatter inside)
    model.zero_grad(set_to_none=True)
    if ws > 1:
        dist.all_reduce(loss)
    return loss.item()


def held_out_eval(model, eng, task, args, max_new_tokens, device, step) -> dict:
    """{"pass@1", "pass@k"} on the held-out items, printed. The same seeds at every evaluation (and
    apart from the training ones), so two evaluations differ by the model only."""
    k, t0 = args.eval_samples, time.time()
    model.eval()
    p1, pk = evaluate_pass(eng, task, k, max_new_tokens, args.temperature, args.top_k, device, seed=args.seed + 10**9)
    model.train()
    print0(f"step {step:05d} | pass@1 {p1:.4f} | pass@{k} {pk:.4f} | ({time.time() - t0:.1f}s)")
    return {"pass@1": p1, f"pass@{k}": pk}


# ----------------------------------------------------------------------------- checkpoints and the report

@dataclass
class LoopState:
    """What a checkpoint keeps of the loop (meta["loop"]) besides weights, optimizer and RNG."""
    rewards: list = field(default_factory=list)  # mean training reward of each step so far
    wall_time: float = 0.0  # seconds of the earlier invocations: a resumed run adds up its parts
    before: dict | None = None  # held-out pass@1/pass@k before the first update
    after: dict | None = None  # ... at the latest evaluation


def resume(ckpt_dir, model, optimizer, tokenizer, rl_meta, device, rank, ws):
    """--resume: (step, LoopState) of the last checkpoint in ckpt_dir, its model, optimizer and RNG
    restored (train.load_resume refuses one of another run: rl_meta must match)."""
    meta = train.load_resume(ckpt_dir, model.config, tokenizer, "rl", rl_meta, device, rank, ws, model, optimizer)
    loop = meta["loop"]
    print0(f"resumed {ckpt_dir} at step {meta['step']}")
    return meta["step"], LoopState(loop["rewards"], loop["wall_time"], loop["before"], loop["after"])


def save(ckpt_dir, step, model, optimizer, run_meta, state, elapsed, device, rank, ws, keep_last):
    """Checkpoint step (all ranks together). run_meta: what every checkpoint of the run says;
    elapsed: this invocation's seconds so far. The RNG goes along so a resumed run samples the same."""
    meta = {"step": step, **run_meta, "loop": {**asdict(state), "wall_time": state.wall_time + elapsed}}
    path = train.save_checkpoint(ckpt_dir, step, model.state_dict(), optimizer.state_dict(), meta, rank, ws,
                                 {"rng": train.rng_state(device)}, keep_last)
    print0(f"saved {path}")


def final_report(args, model, tokenizer, test_task, ckpt_dir, num_steps, state, device, ws, master):
    """The before -> after line, and the "rl" section of the report card."""
    k, before, after, rewards, wall_time = args.eval_samples, state.before, state.after, state.rewards, state.wall_time
    print0(f"pass@1 {before['pass@1']:.4f} -> {after['pass@1']:.4f} | pass@{k} {before[f'pass@{k}']:.4f} -> "
           f"{after[f'pass@{k}']:.4f} | {num_steps} steps | elapsed {train.fmt_time(wall_time)} ({wall_time:.0f}s)")
    # the summary table's row: greedy accuracy on the held-out items, as chat_sft.py measures it, so
    # the SFT and RL columns compare like with like (pass@1 above is sampled at --temperature)
    greedy = evals.evaluate_chat(model, tokenizer, device, [test_task],
                                 generate=evals.engine_generate(model, tokenizer))
    if master:
        tok.write_section("rl", {
            "task": args.task, "init_from": args.init_from, "tag": ckpt_dir.name, "num_steps": num_steps,
            "prompts_per_step": args.prompts_per_step, "samples_per_prompt": args.samples_per_prompt,
            "held_out_items": len(test_task), "pass@1_before": before["pass@1"], "pass@1_after": after["pass@1"],
            test_task.name: greedy[test_task.name],
            f"pass@{k}_before": before[f"pass@{k}"], f"pass@{k}_after": after[f"pass@{k}"],
            "reward_first": rewards[0] if rewards else None, "reward_last": rewards[-1] if rewards else None,
            "reward_curve": evals.sparkline(rewards), "reward_per_step": rewards, "train_time_s": round(wall_time, 1),
            "world_size": ws, "device": str(device)})


# ----------------------------------------------------------------------------- the loop

def parse_args(argv=None):
    p = argparse.ArgumentParser(description="RL on verifiable tasks (chat_rl.py)", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--task", default="gsm8k", choices=list(TASKS), help="gsm8k: GSM8K train/test; toy: offline ToyMath train/test")
    a("--init-from", default="sft", type=train.source_type, help="checkpoint stage to start from: base, mid, sft, rl, or hf:DIR")
    a("--init-tag", default=None, help="its tag (default: the newest)")
    a("--init-step", type=int, default=None, help="its step (default: the last)")
    a("--tag", default=None, help="output folder checkpoints/rl/<tag> (default: --init-tag, else d<depth>)")
    # the loop
    a("--num-steps", type=int, default=-1, help="optimizer steps; -1 = one pass over the training items")
    a("--prompts-per-step", type=int, default=16, help="training questions per step, all ranks together")
    a("--samples-per-prompt", type=int, default=16, help="completions per question: the group of the baseline")
    a("--max-new-tokens", type=int, default=-1, help="per completion; -1 = the task's default (gsm8k 256, toy 64)")
    a("--temperature", type=float, default=1.0, help="sampling temperature, training and eval (1 = the policy itself)")
    a("--top-k", type=int, default=50)
    a("--device-batch-size", type=int, default=8, help="rows per forward/backward")
    # optimization: train.py's rates times --init-lr-frac, then linear decay to 0
    a("--init-lr-frac", type=float, default=0.05)
    train.add_lr_flags(a)
    # evaluation, checkpoints
    a("--eval-every", type=int, default=60, help="held-out pass@1/pass@k every N steps (-1 = before and after only)")
    a("--eval-examples", type=int, default=-1, help="held-out items; -1 = the task's default (gsm8k 400, toy 200)")
    a("--eval-samples", type=int, default=8, help="k of pass@k: samples per held-out item")
    train.add_checkpoint_flags(a, save_every=60)
    a("--device", default="auto", choices=["auto", "cpu", "cuda"])
    a("--seed", type=int, default=42)
    args = p.parse_args(argv)
    for flag in ("prompts_per_step", "device_batch_size", "eval_samples", "top_k"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be >= 1")
    if args.samples_per_prompt < 2:
        p.error(f"--samples-per-prompt {args.samples_per_prompt}: must be >= 2 (a group of one has advantage 0)")
    if args.temperature <= 0:
        p.error(f"--temperature {args.temperature}: must be > 0 (greedy samples are all the same: advantage 0)")
    if args.num_steps == 0 or args.num_steps < -1:
        p.error(f"--num-steps {args.num_steps}: must be >= 1 (or -1 for one pass)")
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        return run(args)
    finally:
        train.compute_cleanup()


def load_tasks(args):
    """(training task, held-out task, max new tokens, steps) of --task, the defaults filled in."""
    make_task, default_new_tokens, default_eval = TASKS[args.task]
    try:  # the data first: an offline GSM8K fails here, not after loading a model
        train_task, test_task = make_task("train"), make_task("test")
    except (evals.EvalError, tok.DataError, OSError) as e:
        raise SystemExit(f"--task {args.task}: {e}") from None
    test_task = test_task[:args.eval_examples if args.eval_examples > 0 else default_eval]
    max_new = args.max_new_tokens if args.max_new_tokens > 0 else default_new_tokens
    num_steps = args.num_steps if args.num_steps > 0 else max(1, len(train_task) // args.prompts_per_step)
    return train_task, test_task, max_new, num_steps


def run(args):
    rank, _, ws, device = train.compute_init(args.device)
    master = rank == 0
    train_task, test_task, max_new, num_steps = load_tasks(args)
    try:
        model, tokenizer, init_meta = train.load_model(args.init_from, args.init_tag, args.init_step, device)
    except (FileNotFoundError, ValueError, tok.DataError) as e:
        raise SystemExit(f"--init-from {args.init_from}: {e}") from None
    config = model.config
    model.train()
    f = args.init_lr_frac
    optimizer = train.setup_optimizer(model, args.embedding_lr * f, args.unembedding_lr * f, args.matrix_lr * f,
                                      args.scalar_lr * f, args.weight_decay, rank, ws)
    eng = engine.Engine(model, tokenizer)
    ckpt_dir = train.checkpoint_root("rl") / (args.tag or args.init_tag or f"d{config.n_layer}")
    log_path = ckpt_dir / "log.jsonl"
    # settings a resumed run must share with the checkpoint (else it would not continue the same run)
    rl_meta = {"task": args.task, "num_steps": num_steps, "prompts_per_step": args.prompts_per_step,
               "samples_per_prompt": args.samples_per_prompt, "max_new_tokens": max_new, "seed": args.seed}
    run_meta = {"model_config": asdict(config), "tokenizer_hash": tokenizer.hash, "world_size": ws, "rl": rl_meta,
                "args": vars(args), "init": {"source": args.init_from, "tag": args.init_tag, "step": init_meta.get("step")}}
    start_step, state = 0, LoopState()
    if args.resume:
        start_step, state = resume(ckpt_dir, model, optimizer, tokenizer, rl_meta, device, rank, ws)
    train.prepare_run_dir(ckpt_dir, log_path, args.resume, args.overwrite, start_step, master)
    train.keep_tokenizer(ckpt_dir, tokenizer, args.init_from, master)

    def log(entry):
        if master:
            train.append_jsonl(log_path, entry)

    print0(f"RL on {args.task}: {len(train_task)} training items, {len(test_task)} held-out | {num_steps} steps x "
           f"{args.prompts_per_step} prompts x {args.samples_per_prompt} samples | {ws} rank(s) on {device} | "
           f"from {args.init_from} ({sum(p.numel() for p in model.parameters()):,} params)")
    t_start, step, step_time = time.time(), start_step, 0.0
    while True:
        # 3) evaluate and checkpoint the model after `step` updates: here at the top, so step 0 is measured too
        last = step == num_steps
        stop = last or step == args.stop_at_step
        if (args.eval_every > 0 and step % args.eval_every == 0) or last or (step == 0 and state.before is None):
            state.after = held_out_eval(model, eng, test_task, args, max_new, device, step)
            state.before = state.before or state.after
            log({"step": step, **state.after})
        if stop or (args.save_every > 0 and step % args.save_every == 0 and step > start_step):
            save(ckpt_dir, step, model, optimizer, run_meta, state, time.time() - t_start, device, rank, ws, args.keep_last)
        if stop:
            break

        # 1) sample and grade
        t0 = time.time()
        groups = sample_groups(model, eng, train_task, step, args, max_new, rank, ws)
        t_sample = time.time() - t0
        num_tokens, reward_sum, n_samples, n_flat = step_totals(groups, device, ws)  # n_flat: groups without signal
        # 2) learn
        lrm = train.lr_multiplier(step, num_steps, 0.0, 1.0, 0.0)  # linear decay to 0
        loss = policy_update(model, optimizer, groups, num_tokens, lrm, step, args.device_batch_size, device, ws)
        dt = time.time() - t0
        step_time += dt
        reward = reward_sum / max(n_samples, 1)
        state.rewards.append(reward)
        eta = step_time / (step + 1 - start_step) * (num_steps - step - 1)
        print0(f"step {step + 1:05d}/{num_steps:05d} | reward {reward:.4f} | groups without signal {n_flat:.0f} | "
               f"tokens {num_tokens:,.0f} | lrm {lrm:.2f} | {dt * 1000:.0f}ms ({t_sample * 1000:.0f}ms sampling) | "
               f"elapsed {train.fmt_time(time.time() - t_start)} | eta {train.fmt_time(eta)}")
        log({"step": step, "reward": reward, "pg_loss": loss, "sampled_tokens": num_tokens, "lrm": lrm, "dt": dt})
        step += 1

    state.wall_time += time.time() - t_start  # this invocation's share
    if last:
        final_report(args, model, tokenizer, test_task, ckpt_dir, num_steps, state, device, ws, master)
    return {"step": step, "before": state.before, "after": state.after, "rewards": state.rewards, "ckpt_dir": ckpt_dir}


if __name__ == "__main__":
    tok.run_main(main)
