"""``leantrain rail``: experts, GAIL/RAIL training and tail-risk evaluation (arXiv:1707.06658).

- ``leantrain rail expert --env ENV --steps N [--algo sac|ppo] --out DIR``: train an expert with
  stable-baselines3 and write ``DIR/expert.zip`` and ``DIR/trajectories.npz`` (``--count`` demos);
  ``--trajectories FILE`` instead validates a user's own demonstrations and stores them in DIR.
- ``leantrain rail train --env ENV --algo gail|rail --expert FILE --steps N --out DIR``
  (``--alpha``, ``--lam``, ``--resume``, periodic evaluation, atomic checkpoints).
- ``leantrain rail eval DIR --episodes 50 [--json]``: cost statistics of the trained agent next to
  the expert's.
- ``leantrain rail medium --out DIR``: the medium reproduction profile (Hopper-v5 and HalfCheetah-v5,
  5 seeds, 70 iterations, about 40 min on 2 cores); commit ``DIR/metrics.json`` and the
  plots under ``leantrain/assets/rail/medium/`` to show them in the report.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from leantrain.app.commands import add_common, emit, resolve_device

CHECKPOINT = "checkpoint.pt"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("rail", help="GAIL/RAIL imitation: experts, training, tail-risk evaluation",
                       description="Risk-averse imitation learning (RAIL, arXiv:1707.06658) and GAIL on gymnasium tasks.")
    rs = p.add_subparsers(dest="rail_command", metavar="SUBCOMMAND")
    rs.required = True

    e = rs.add_parser("expert", help="train an SB3 expert and record demonstrations (or import your own)")
    e.add_argument("--env", required=True, help="gymnasium id, e.g. Hopper-v5, InvertedPendulum-v5, Pendulum-v1")
    e.add_argument("--steps", type=int, default=None, help="expert training steps (default: the task's setting)")
    e.add_argument("--algo", choices=["sac", "ppo"], default=None, help="stable-baselines3 algorithm (default: per task)")
    e.add_argument("--count", type=int, default=25, help="demonstrations to record (default 25, as in RAIL)")
    e.add_argument("--deterministic", action="store_true", help="record the expert's mean action (default: sampled)")
    e.add_argument("--model", default=None, help="record from this existing expert.zip instead of training")
    e.add_argument("--trajectories", default=None, help="import your own .npz demonstrations (see docs/rail.md)")
    add_common(e, out="results/rail/expert")
    e.set_defaults(func=run_expert)

    t = rs.add_parser("train", help="train GAIL or RAIL from expert demonstrations")
    t.add_argument("--env", required=True, help="gymnasium id")
    t.add_argument("--algo", choices=["gail", "rail"], required=True, help="gail = rail with lam 0")
    t.add_argument("--expert", required=True, help="expert trajectories .npz (expert.zip beside it is used by eval)")
    t.add_argument("--alpha", type=float, default=0.9, help="CVaR level (default 0.9)")
    t.add_argument("--lam", type=float, default=None, help="CVaR weight for rail (default: the paper's value per task)")
    t.add_argument("--steps", type=int, required=True, help="total environment steps to train for")
    t.add_argument("--batch-steps", type=int, default=None, help="state-action pairs per iteration (default 50000)")
    t.add_argument("--n-envs", type=int, default=8, help="vectorized environments for rollouts (default 8)")
    t.add_argument("--nu-mode", choices=["var", "gradient"], default="var",
                   help="var (default): nu = the batch's VaR of R_j, the exact minimizer of the CVaR objective; "
                        "gradient: the authors' code, gradient descent on nu from U[0,1) with lr 0.01")
    t.add_argument("--disc-cvar-weight", type=float, default=1.0,
                   help="weight of the discriminator's CVaR term of the RAIL objective (default 1; 0 disables)")
    t.add_argument("--eval-every", type=int, default=10, help="evaluate every K iterations (0: never; default 10)")
    t.add_argument("--eval-episodes", type=int, default=10, help="episodes per periodic evaluation (default 10)")
    t.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_common(t, out="results/rail/run")
    t.set_defaults(func=run_train)

    v = rs.add_parser("eval", help="evaluate a trained agent on the true cost (and the expert beside it)")
    v.add_argument("dir", help="training output directory (holds checkpoint.pt)")
    v.add_argument("--episodes", type=int, default=50, help="evaluation episodes (default 50, as in RAIL)")
    v.add_argument("--alpha", type=float, default=0.9, help="VaR/CVaR level (default 0.9)")
    v.add_argument("--expert-model", default=None, help="expert.zip to evaluate alongside (default: beside the trajectories)")
    add_common(v, out=None)
    v.set_defaults(func=run_eval)

    _register_medium(rs)


def _register_medium(rs: argparse._SubParsersAction) -> None:
    from leantrain.app.experiments.rail import MediumProfile

    d = MediumProfile()
    m = rs.add_parser("medium", help="medium reproduction profile: GAIL vs RAIL on Hopper-v5 and HalfCheetah-v5",
                      description="Runs the medium profile (about 40 min on 2 cores with the defaults) and writes "
                                  "OUT/metrics.json and plots; commit them under leantrain/assets/rail/medium/ to show "
                                  "them in the report (docs/rail.md).")
    m.add_argument("--tasks", nargs="+", default=list(d.tasks), help=f"gymnasium ids (default: {' '.join(d.tasks)})")
    m.add_argument("--seeds", type=int, default=d.seeds, help=f"seeds per method (default {d.seeds})")
    m.add_argument("--iterations", type=int, default=d.iterations, help=f"iterations per run (default {d.iterations})")
    m.add_argument("--batch-steps", type=int, default=d.batch_steps, help=f"pairs per iteration (default {d.batch_steps})")
    m.add_argument("--n-envs", type=int, default=d.n_envs, help=f"vectorized environments (default {d.n_envs})")
    m.add_argument("--eval-episodes", type=int, default=d.eval_episodes,
                   help=f"evaluation rollouts per agent (default {d.eval_episodes})")
    m.add_argument("--experts", default=None, help="folder holding ENV/expert.zip and ENV/trajectories.npz per task "
                                                   "(default: the shipped leantrain/assets/rail/ENV)")
    m.add_argument("--workers", type=int, default=None, help="training processes (default: min(2, cores))")
    add_common(m, out="results/rail/medium")
    m.set_defaults(func=run_medium)


def run_medium(args: argparse.Namespace) -> int:
    from leantrain.app.experiments.rail import MediumProfile
    from leantrain.app.experiments.rail import run_medium as medium

    if args.workers is not None and args.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {args.workers}")
    profile = MediumProfile(tuple(args.tasks), args.seeds, args.iterations, args.batch_steps, args.n_envs,
                            args.eval_episodes)
    m = medium(args.out, profile, experts=args.experts, base_seed=args.seed, device=resolve_device(args.device),
               workers=args.workers)
    lines = [f"medium profile: {', '.join(profile.tasks)}, {profile.seeds} seeds, {m['wall_seconds'] / 60:.1f} min wall"]
    for env_id, res in m["tasks"].items():
        for r in res["runs"]:
            lines.append(f"  {env_id} {r['variant']:4s} seed {r['seed']}: mean cost {r['mean']:.1f}  "
                         f"CVaR_0.9 {r['CVaR_0.9']:.1f}")
    lines.append(f"wrote {Path(args.out) / 'metrics.json'}")
    emit(args, {"out": str(args.out), "wall_seconds": m["wall_seconds"], "cpu_seconds": m["cpu_seconds"]},
         "\n".join(lines))
    return 0


def _fmt(s: dict, alpha: float) -> str:
    return (f"mean {s['mean']:.2f}  std {s['std']:.2f}  VaR_{alpha:g} {s[f'VaR_{alpha:g}']:.2f}  "
            f"CVaR_{alpha:g} {s[f'CVaR_{alpha:g}']:.2f}  (n={s['episodes']})")


def run_expert(args: argparse.Namespace) -> int:
    from leantrain.imitation.envs import space_dims, task
    from leantrain.imitation.experts import TRAJECTORIES_FILE, load_expert, record_trajectories, train_expert
    from leantrain.imitation.risk import summarize_costs
    from leantrain.imitation.trajectories import load_trajectories, save_trajectories

    spec = task(args.env)
    out = Path(args.out)
    if args.trajectories is not None:
        traj = load_trajectories(args.trajectories)
        traj.check_spaces(*space_dims(args.env), args.env)
        if traj.env_id and traj.env_id != args.env:
            raise ValueError(f"--trajectories were recorded on {traj.env_id!r}, not on --env {args.env!r}")
        traj.env_id = args.env
        source = f"imported {args.trajectories}"
    else:
        if args.count < 1:
            raise ValueError(f"--count must be >= 1, got {args.count}")
        if args.model is not None:
            expert = load_expert(args.model, args.env)
            source = f"recorded from {args.model}"
        else:
            steps = spec.expert_steps if args.steps is None else args.steps
            if steps < 1:
                raise ValueError(f"--steps must be >= 1, got {steps}")
            expert = train_expert(args.env, steps, out, algo=args.algo or spec.expert_algo, seed=args.seed,
                                  device=resolve_device(args.device), progress=not args.json)
            source = f"trained {expert.algo} for {steps} steps"
        traj = record_trajectories(expert, args.count, seed=args.seed, deterministic=args.deterministic)
    path = save_trajectories(out / TRAJECTORIES_FILE, traj)
    returns = traj.returns()
    data = {"env": args.env, "source": source, "trajectories": str(path), "count": traj.count,
            "lengths": traj.lengths.tolist(),
            "cost_summary": None if returns is None else summarize_costs(-returns).as_dict()}
    text = f"{source}; {traj.count} trajectories -> {path}"
    if returns is not None:
        text += f"\nexpert cost: {_fmt(data['cost_summary'], 0.9)}"
    emit(args, data, text)
    return 0


def run_train(args: argparse.Namespace) -> int:
    from leantrain.imitation.envs import task
    from leantrain.imitation.rail import RAIL, RAILConfig
    from leantrain.imitation.trajectories import load_trajectories
    from leantrain.storage import load_torch, write_json

    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    if args.algo == "gail":
        if args.lam not in (None, 0.0):
            raise ValueError(f"--algo gail means lam = 0; got --lam {args.lam} (use --algo rail)")
        lam = 0.0
    else:
        lam = task(args.env).lam if args.lam is None else args.lam
        if lam <= 0:
            raise ValueError(f"--algo rail needs --lam > 0, got {lam} (lam = 0 is --algo gail)")
    kwargs = {"alpha": args.alpha, "lam": lam, "n_envs": args.n_envs, "nu_mode": args.nu_mode,
              "disc_cvar_weight": args.disc_cvar_weight}
    if args.batch_steps is not None:
        kwargs["batch_steps"] = args.batch_steps
    config = RAILConfig(**kwargs)
    out = Path(args.out)
    ckpt = out / CHECKPOINT
    if ckpt.is_file() and not args.resume:
        raise ValueError(f"{ckpt} exists; pass --resume to continue it or choose another --out")
    if args.resume and ckpt.is_file():
        saved = RAIL.config_from_state(load_torch(ckpt)["algo"])
        if saved != config:
            raise ValueError(f"--resume: the options differ from the checkpoint's ({saved} vs {config})")
    expert = load_trajectories(args.expert)
    algo = RAIL(args.env, expert, config, seed=args.seed, device=resolve_device(args.device))
    algo.metadata = {"expert_trajectories": str(Path(args.expert).resolve())}
    write_json(out / "run.json", {"env": args.env, "algo": args.algo, "expert": str(Path(args.expert).resolve()),
                                  "steps": args.steps, "seed": args.seed, "config": config})
    try:
        history = algo.learn(args.steps, checkpoint=ckpt, resume=args.resume, eval_every=args.eval_every,
                             eval_episodes=args.eval_episodes, progress=not (args.no_progress or args.json),
                             on_iteration=lambda _: write_json(out / "history.json", algo.history))
    finally:
        algo.close()
    write_json(out / "history.json", history)
    last = history[-1]
    data = {"out": str(out), "iterations": algo.iteration, "steps": algo.total_steps, "nu": algo.nu, "last": last}
    emit(args, data, f"{args.algo} on {args.env}: {algo.iteration} iterations, {algo.total_steps} steps, "
                     f"last batch mean return {last['true_return_mean']:.2f}, nu {algo.nu:.4f}; checkpoint {ckpt}")
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from leantrain.imitation.evaluation import cost_histograms, evaluate_policy, load_agent, tail_report
    from leantrain.imitation.experts import MODEL_FILE, load_expert
    from leantrain.imitation.risk import summarize_costs
    from leantrain.imitation.trajectories import load_trajectories
    from leantrain.storage import write_json

    if args.episodes < 1:
        raise ValueError(f"--episodes must be >= 1, got {args.episodes}")
    d = Path(args.dir)
    if not (d / CHECKPOINT).is_file():
        raise ValueError(f"{d} holds no {CHECKPOINT}; train first with 'leantrain rail train --out {d}'")
    act, algo_state = load_agent(d / CHECKPOINT, seed=args.seed)
    env_id, cfg = algo_state["env_id"], algo_state["config"]
    name = "GAIL" if cfg["lam"] == 0 else "RAIL"
    agent = evaluate_policy(act, env_id, episodes=args.episodes, seed=args.seed, alpha=args.alpha)
    data: dict = {"env": env_id, "algo": name, "iterations": algo_state["iteration"], "agent": agent}
    costs = {name: agent["costs"]}
    expert_model = args.expert_model
    traj_path = algo_state.get("metadata", {}).get("expert_trajectories")
    if expert_model is None and traj_path and (Path(traj_path).parent / MODEL_FILE).is_file():
        expert_model = str(Path(traj_path).parent / MODEL_FILE)
    expert_summary = None
    if expert_model is not None:
        expert = load_expert(expert_model, env_id)
        ex = evaluate_policy(expert, env_id, episodes=args.episodes, seed=args.seed, alpha=args.alpha)
        data["expert"], expert_summary, costs["expert"] = ex, ex["summary"], ex["costs"]
        data["expert_source"] = f"{args.episodes} rollouts of {expert_model}"
    elif traj_path and Path(traj_path).is_file():
        ret = load_trajectories(traj_path).returns()
        if ret is not None:
            expert_summary = summarize_costs(-ret, args.alpha).as_dict()
            data["expert"] = {"summary": expert_summary, "costs": (-ret).tolist()}
            costs["expert"] = (-ret).tolist()
            data["expert_source"] = f"returns stored in {traj_path} (no expert model found)"
    if expert_summary is not None:
        data["tail"] = tail_report(expert_summary, {name: agent["summary"]}, args.alpha)
    write_json(d / "eval.json", data)
    cost_histograms(d / "eval_costs.png", costs, title=f"{name} on {env_id}: trajectory cost", alpha=args.alpha)
    lines = [f"{name} on {env_id} after {algo_state['iteration']} iterations:", f"  agent : {_fmt(agent['summary'], args.alpha)}"]
    if expert_summary is not None:
        lines.append(f"  expert: {_fmt(expert_summary, args.alpha)}")
        rel = data["tail"]["relative_tail_risk_percent"][name]
        lines.append(f"  tail risk relative to expert: VaR {rel['VaR']:+.1f}%  CVaR {rel['CVaR']:+.1f}%")
    lines.append(f"  wrote {d / 'eval.json'} and {d / 'eval_costs.png'}")
    emit(args, json.loads(json.dumps(data, default=str)), "\n".join(lines))
    return 0
