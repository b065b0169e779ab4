"""Post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion
Models", EDM2, section 3 and appendix C): track power-function EMA profiles during training, save
their snapshots, and reconstruct the EMA of any length from the snapshots after training.

A power-function EMA at step ``t`` weights the parameter trajectory with the profile
``p(tau) = (gamma + 1) tau^gamma / t^(gamma + 1)`` on ``[0, t]``. Its length is the relative
standard deviation ``sigma_rel`` of that profile (the width as a fraction of training so far), so
one ``sigma_rel`` means the same averaging at step 10k and at step 400k. The per-step update
``ema <- beta_t ema + (1 - beta_t) theta_t`` with ``beta_t = (1 - 1/t)^(gamma + 1)`` gives step
``s <= t`` the weight ``(s^(gamma+1) - (s-1)^(gamma+1)) / t^(gamma+1)``: exactly the profile's
mass on ``(s-1, s]``, so the tracked EMA *is* the profile applied to the trajectory that holds
``theta_s`` during step ``s``. A combination ``sum_i x_i snapshot_i`` is therefore the
trajectory weighted by ``sum_i x_i p_i``; ``solve_weights`` picks the ``x`` whose profile is
closest (in L2) to the wanted one.

Library (train.py wires it; ``tests/test_posthoc_ema.py`` tests it)::

    tracker = PowerFunctionEMA(model.parameters(), sigma_rels=(0.05, 0.10))
    ...after optimizer step ``step`` (1, 2, ...):  tracker.update(model.parameters(), step)
    ...every N steps:  save_snapshot(exp_dir, step, names, tracker)   # <exp>/posthoc-ema/<step:07d>.pt

Tool::

    python posthoc_ema.py --exp-dir EXP --sigma-rel 0.07 [--step N] [--template CKPT] [--out OUT.pt]

writes a checkpoint that generate.py reads: the training checkpoint with its "ema" replaced by the
reconstruction and its optimizer state dropped.
"""
import argparse
import math
import os
import re

import numpy as np
import torch

from errors import UserError, run_cli
from flagcheck import AT_LEAST_0, check_ranges
from models.checkpoint import CheckpointError, atomic_save, load_checkpoint_file

SNAPSHOT_DIR = "posthoc-ema"              # <exp>/posthoc-ema/<step:07d>.pt
STEP_FILE = re.compile(r"^(\d{7,})\.pt$")  # snapshot and checkpoint names (temporaries excluded)
DEFAULT_SIGMA_RELS = (0.05, 0.10)          # EDM2's two tracked profiles (gamma 16.97 and 6.94)
MAX_SIGMA_REL = 1.0 / math.sqrt(12.0)      # gamma = 0: a uniform average over all of training
FIT_WARNING = 0.05                         # relative L2 profile error above which the tool warns
DEFAULT_OUT = os.path.join("{exp_dir}", SNAPSHOT_DIR, "reconstructed", "{step:07d}-sigma{sigma_rel}.pt")


class PosthocEMAError(UserError, RuntimeError):
    """A problem the user can fix (flags, missing or mismatched snapshots); the message is one line."""


#################################################################################
#                        Profile length: sigma_rel <-> gamma                    #
#################################################################################

def gamma_to_sigma_rel(gamma):
    """Relative std of the profile ``(gamma+1) x^gamma`` on [0, 1] (a Beta(gamma+1, 1) density):
    ``sqrt((gamma+1) / ((gamma+2)^2 (gamma+3)))``. Defined for gamma > -1."""
    gamma = float(gamma)
    if not gamma > -1.0:
        raise ValueError(f"power-function EMA exponent gamma must be > -1, got {gamma}")
    return math.sqrt((gamma + 1.0) / ((gamma + 2.0) ** 2 * (gamma + 3.0)))


def sigma_rel_to_gamma(sigma_rel):
    """The exponent gamma >= 0 whose profile has relative std ``sigma_rel`` in (0, 1/sqrt(12)].

    Squaring ``gamma_to_sigma_rel`` and clearing denominators gives, with ``k = sigma_rel^-2``,
    the cubic ``q(g) = g^3 + 7 g^2 + (16 - k) g + (12 - k) = 0``. For ``k >= 12`` it has exactly
    one root in [0, inf) (one sign change in its coefficients), ``q(0) <= 0 < q(sqrt(k))``, and
    ``q`` is increasing and convex there, so Newton's method started at ``sqrt(k)`` descends
    monotonically onto the root and stops when a step no longer moves it.
    """
    sigma_rel = float(sigma_rel)
    if not 0.0 < sigma_rel <= MAX_SIGMA_REL:
        raise ValueError(f"sigma_rel must be in (0, {MAX_SIGMA_REL:.4f}] ({MAX_SIGMA_REL:.4f} averages all of "
                         f"training uniformly; EDM2 tracks 0.05 and 0.10), got {sigma_rel}")
    k = sigma_rel ** -2
    gamma = math.sqrt(k)
    for _ in range(200):
        q = ((gamma + 7.0) * gamma + 16.0 - k) * gamma + 12.0 - k
        dq = (3.0 * gamma + 14.0) * gamma + 16.0 - k
        new = max(gamma - q / dq, 0.0)
        if not new < gamma:  # rounding: the monotone descent has stopped at the root
            break
        gamma = new
    return gamma


def power_ema_beta(step, gamma, delta=1):
    """Decay of the power-function EMA at optimizer step ``step`` (counted from 1):
    ``(1 - delta/step)^(gamma+1)``, where ``delta`` steps passed since the previous update (EDM2
    appendix C counts time in images; at a fixed batch size the ratio is the same). ``beta`` is 0
    at the first step: the EMA starts as the parameters after step 1, the initial weights get none."""
    if not 0 < delta <= step:
        raise ValueError(f"power-function EMA update at step {step} after {delta} steps: need 0 < delta <= step")
    return (1.0 - delta / step) ** (gamma + 1.0)


#################################################################################
#                            Tracking during training                           #
#################################################################################

class PowerFunctionEMA:
    """fp32 power-function EMAs of a list of tensors, one copy per ``sigma_rel`` profile.

    ``update(params, step)`` after every optimizer step (skipped non-finite steps included, so
    the trajectory holds the unchanged parameters for that step); ``state_dict`` /
    ``load_state_dict`` resume exactly; ``snapshot`` is what ``save_snapshot`` writes. ``step``
    is the step of the last update: 0 for a fresh run; N to switch post-hoc EMA on at step N of
    a run that had it off (the profiles then count ``params`` as the weights of steps 1..N).
    """

    def __init__(self, params, sigma_rels=DEFAULT_SIGMA_RELS, step=0):
        self.sigma_rels = tuple(float(s) for s in sigma_rels)
        if not self.sigma_rels or len(set(self.sigma_rels)) != len(self.sigma_rels):
            raise ValueError(f"post-hoc EMA needs distinct sigma_rels, got {list(sigma_rels)}")
        self.gammas = tuple(sigma_rel_to_gamma(s) for s in self.sigma_rels)
        params = [p.detach() for p in params]
        self.ema = [[p.to(torch.float32, copy=True) for p in params] for _ in self.sigma_rels]
        self.step = int(step)

    @torch.no_grad()
    def update(self, params, step):
        """Fold the parameters after optimizer step ``step`` into every profile (one foreach lerp each)."""
        step = int(step)
        if step <= self.step:
            raise ValueError(f"post-hoc EMA update at step {step}, but it already holds step {self.step}")
        params = [p.detach() for p in params]
        if len(params) != len(self.ema[0]):
            raise ValueError(f"post-hoc EMA tracks {len(self.ema[0])} tensors, update got {len(params)}")
        params = [p if p.dtype == torch.float32 else p.float() for p in params]
        for gamma, ema in zip(self.gammas, self.ema):
            torch._foreach_lerp_(ema, params, 1.0 - power_ema_beta(step, gamma, step - self.step))
        self.step = step

    def state_dict(self):
        """What exact resume needs (tensors are the live copies; torch.save writes them)."""
        return {"sigma_rels": list(self.sigma_rels), "gammas": list(self.gammas), "step": self.step,
                "ema": [list(ema) for ema in self.ema]}

    @torch.no_grad()
    def load_state_dict(self, state):
        if [float(s) for s in state["sigma_rels"]] != list(self.sigma_rels):
            raise ValueError(f"the saved post-hoc EMA tracks sigma_rels {list(state['sigma_rels'])}, this run "
                             f"{list(self.sigma_rels)}; use the saved values (--posthoc-ema-sigma-rels)")
        for saved, ema in zip(state["ema"], self.ema):
            if len(saved) != len(ema) or any(s.shape != e.shape for s, e in zip(saved, ema)):
                raise ValueError("the saved post-hoc EMA holds other tensors than this model's parameters")
            torch._foreach_copy_(ema, [s.to(e.device) for s, e in zip(saved, ema)])
        self.step = int(state["step"])

    def snapshot(self, step, names, source=None):
        """CPU copy of every profile at ``step`` (must be the last update) as a snapshot file's dict."""
        names = list(names)
        if int(step) != self.step:
            raise ValueError(f"post-hoc EMA snapshot for step {step}, but the last update was step {self.step}")
        if len(names) != len(self.ema[0]):
            raise ValueError(f"{len(names)} parameter names for {len(self.ema[0])} tracked tensors")
        return {
            "step": self.step,
            "sigma_rels": list(self.sigma_rels),
            "gammas": list(self.gammas),
            "ema": [{n: t.detach().to("cpu", copy=True) for n, t in zip(names, ema)} for ema in self.ema],
            "source": dict(source or {}),
        }


def snapshot_path(exp_dir, step):
    return os.path.join(exp_dir, SNAPSHOT_DIR, f"{int(step):07d}.pt")


def save_snapshot(exp_dir, step, names, tracker, extra=None):
    """Write ``tracker``'s profiles at ``step`` to ``<exp_dir>/posthoc-ema/<step:07d>.pt`` atomically.
    ``names`` are the model's parameter names (the unwrapped model's, in ``parameters()`` order);
    ``extra`` goes to the file's "source" entry (e.g. samples seen). Returns the path."""
    path = snapshot_path(exp_dir, step)
    atomic_save(tracker.snapshot(step, names, extra), path)
    return path


def list_step_files(folder):
    """Sorted [(step, path)] of the ``<step:07d>.pt`` files in ``folder`` ([] when it does not exist)."""
    if not os.path.isdir(folder):
        return []
    found = [(int(m.group(1)), os.path.join(folder, name))
             for name in os.listdir(folder) if (m := STEP_FILE.match(name))]
    return sorted(found)


#################################################################################
#                           Post-hoc reconstruction                             #
#################################################################################

def profile_inner_products(steps_a, gammas_a, steps_b, gammas_b):
    """Matrix of L2 inner products <p_a, p_b> between power-function profiles (float64).

    With ``p(tau) = (g+1) tau^g / t^(g+1)`` on [0, t] and 0 after, the product of two profiles
    is nonzero up to the shorter time ``m = min(t_a, t_b)``; integrating ``tau^(g_a + g_b)``
    there and writing ``M = max(t_a, t_b)`` and ``g_M`` for the exponent of the profile that
    ends at ``M`` gives ``(g_a+1)(g_b+1) / (g_a+g_b+1) * (m/M)^g_M / M``. The ratio form never
    overflows (``(m/M)^g`` <= 1) however long training or large gamma is.
    """
    ta, ga = (np.asarray(v, dtype=np.float64).reshape(-1, 1) for v in (steps_a, gammas_a))
    tb, gb = (np.asarray(v, dtype=np.float64).reshape(1, -1) for v in (steps_b, gammas_b))
    shorter, longer = np.minimum(ta, tb), np.maximum(ta, tb)
    g_longer = np.where(ta >= tb, ga, gb)
    return (ga + 1) * (gb + 1) / (ga + gb + 1) * (shorter / longer) ** g_longer / longer


def solve_weights(snapshot_steps, snapshot_gammas, target_step, target_gamma):
    """Coefficients ``x`` (one per snapshot profile) so that ``sum_i x_i snapshot_i`` is the
    power-function EMA (``target_step``, ``target_gamma``), in the least-squares sense.

    Every snapshot is its profile ``p_i`` applied to the same parameter trajectory, so we pick
    the combination of profiles nearest the target profile ``p_r`` in L2 over training time:
    minimise ``|sum_i x_i p_i - p_r|^2`` subject to ``sum_i x_i = 1`` (the result stays an
    average: a constant trajectory is reproduced exactly). Expanding the square, the objective
    is ``x^T A x - 2 x^T b + <p_r, p_r>`` with Gram matrix ``A_ij = <p_i, p_j>`` and
    ``b_i = <p_i, p_r>``, all in closed form (``profile_inner_products``); the constraint adds
    one Lagrange multiplier, and we solve the bordered system ``[[A, 1], [1^T, 0]] [x, lam] =
    [b, 1]`` by least squares (A is a Gram matrix of near-collinear functions, often close to
    singular; lstsq then returns the smallest-norm of the equally good solutions). A tracked
    profile that is among the snapshots is reproduced by ``x = e_i`` with zero residual.
    Returns (x, fit_error): ``fit_error = |sum x_i p_i - p_r| / |p_r|``, 0 for an exact fit.
    """
    steps = np.asarray(snapshot_steps, dtype=np.float64)
    gammas = np.asarray(snapshot_gammas, dtype=np.float64)
    n = steps.size
    if n == 0 or gammas.size != n:
        raise ValueError(f"solve_weights needs matching non-empty steps and gammas, got {n} and {gammas.size}")
    gram = profile_inner_products(steps, gammas, steps, gammas)
    b = profile_inner_products(steps, gammas, [target_step], [target_gamma])[:, 0]
    target_norm2 = profile_inner_products([target_step], [target_gamma], [target_step], [target_gamma])[0, 0]
    system = np.zeros((n + 1, n + 1))
    system[:n, :n], system[:n, n], system[n, :n] = gram, 1.0, 1.0
    x = np.linalg.lstsq(system, np.append(b, 1.0), rcond=None)[0][:n]
    residual2 = max(x @ gram @ x - 2.0 * x @ b + target_norm2, 0.0)
    return x, math.sqrt(residual2 / target_norm2)


def step_weights(step, gamma, num_steps):
    """Weights of the parameters after steps 1..num_steps in the tracked EMA at ``step`` (float64):
    ``(s^(g+1) - (s-1)^(g+1)) / step^(g+1)`` for s <= step, 0 after (the closed form of the update)."""
    s = np.arange(1, num_steps + 1, dtype=np.float64)
    upper = np.minimum(s, step) / step
    lower = np.minimum(s - 1, step) / step
    return upper ** (gamma + 1) - lower ** (gamma + 1)


def read_snapshot(path):
    try:
        snapshot = load_checkpoint_file(path)
    except CheckpointError as exc:
        raise PosthocEMAError(f"post-hoc EMA snapshot {exc}") from None
    if not isinstance(snapshot, dict) or not {"step", "gammas", "sigma_rels", "ema"} <= set(snapshot):
        raise PosthocEMAError(f"{path} is not a post-hoc EMA snapshot (no step/gammas/ema entries)")
    return snapshot


def reconstruction_plan(snapshot_paths, sigma_rels, target_step=None):
    """Which snapshot profiles enter and with what coefficients: dict with "target_step", "columns"
    [(path, step, profile index, gamma)], "weights" (columns x targets) and "fit_errors".

    Only snapshots up to ``target_step`` (default: the latest) enter; ``target_step`` must be a
    snapshot's step (the reconstruction is exact only where the tracked EMAs were observed)."""
    snapshots = []
    for path in snapshot_paths:
        snapshot = read_snapshot(path)  # mmap: only the small metadata is read here
        snapshots.append((int(snapshot["step"]), path, [float(g) for g in snapshot["gammas"]]))
        del snapshot
    if not snapshots:
        raise PosthocEMAError("no post-hoc EMA snapshots given (train with --posthoc-ema-sigma-rels)")
    steps = sorted({s for s, _, _ in snapshots})
    if target_step is None:
        target_step = steps[-1]
    elif int(target_step) not in steps:
        raise PosthocEMAError(f"--step {target_step} is not a snapshot step; available: "
                              f"{', '.join(str(s) for s in steps)}")
    target_step = int(target_step)
    columns = [(path, step, k, gamma) for step, path, gammas in sorted(snapshots)
               if step <= target_step for k, gamma in enumerate(gammas)]
    weights, fit_errors = [], []
    for sigma_rel in sigma_rels:
        try:
            gamma = sigma_rel_to_gamma(sigma_rel)
        except ValueError as exc:
            raise PosthocEMAError(f"--sigma-rel: {exc}") from None
        x, err = solve_weights([c[1] for c in columns], [c[3] for c in columns], target_step, gamma)
        weights.append(x)
        fit_errors.append(err)
    return {"target_step": target_step, "columns": columns, "weights": np.stack(weights, axis=1),
            "fit_errors": fit_errors}


@torch.no_grad()
def reconstruct(snapshot_paths, sigma_rel, target_step=None, return_plan=False):
    """The power-function EMA of length ``sigma_rel`` at ``target_step`` (default: the latest
    snapshot) as a state dict keyed by parameter name (fp32), from snapshot files.

    ``sigma_rel`` may be a list: then a list of state dicts, reading each snapshot once. The sum
    is accumulated in float64 (the coefficients alternate in sign). ``return_plan`` also
    returns ``reconstruction_plan``'s dict."""
    several = not isinstance(sigma_rel, (int, float))
    sigma_rels = [float(s) for s in sigma_rel] if several else [float(sigma_rel)]
    plan = reconstruction_plan(snapshot_paths, sigma_rels, target_step)
    sums, reference = [None] * len(sigma_rels), None
    by_path = {}
    for index, (path, _, k, _) in enumerate(plan["columns"]):
        by_path.setdefault(path, []).append((index, k))
    for path, entries in by_path.items():
        snapshot = read_snapshot(path)
        for index, k in entries:
            state = snapshot["ema"][k]
            layout = {n: tuple(t.shape) for n, t in state.items()}
            if reference is None:
                reference = (path, layout)
            elif layout != reference[1]:
                raise PosthocEMAError(f"{path} holds other parameters than {reference[0]} (names or shapes "
                                      "differ); keep one run's snapshots in one folder")
            for j, acc in enumerate(sums):
                coefficient = float(plan["weights"][index, j])
                if acc is None:
                    sums[j] = {n: t.double() * coefficient for n, t in state.items()}
                else:
                    for n, t in state.items():
                        acc[n].add_(t.double(), alpha=coefficient)
        del snapshot
    states = [{n: t.float() for n, t in acc.items()} for acc in sums]
    result = states if several else states[0]
    return (result, plan) if return_plan else result


#################################################################################
#                  Tool: a generate.py checkpoint from the snapshots            #
#################################################################################

def build_output_checkpoint(template, template_path, ema_state, sigma_rel, plan, j):
    """``template`` with "ema" replaced by ``ema_state`` (buffers and other keys kept), optimizer
    and scaler state dropped, and a "posthoc_ema" record of how the weights were made."""
    old_ema = template.get("ema")
    if not isinstance(old_ema, dict):
        raise PosthocEMAError(f"--template {template_path} has no 'ema' state dict; pass a train.py checkpoint")
    unknown = [n for n in ema_state if n not in old_ema]
    if unknown:
        raise PosthocEMAError(f"--template {template_path} has no {unknown[0]} (and {len(unknown) - 1} more "
                              "snapshot parameters): it is not from the run that wrote the snapshots")
    for name, value in ema_state.items():
        if tuple(old_ema[name].shape) != tuple(value.shape):
            raise PosthocEMAError(f"--template {template_path}: {name} is {tuple(old_ema[name].shape)}, the "
                                  f"snapshots hold {tuple(value.shape)}; pass a checkpoint of the same run")
    ema = {n: ema_state[n].to(t.dtype) if n in ema_state else t for n, t in old_ema.items()}
    out = {k: v for k, v in template.items() if k not in ("opt", "scaler")}
    out["ema"] = ema
    columns = plan["columns"]
    paths = list(dict.fromkeys(c[0] for c in columns))
    out["posthoc_ema"] = {
        "sigma_rel": float(sigma_rel),
        "gamma": sigma_rel_to_gamma(sigma_rel),
        "step": plan["target_step"],
        "snapshots": [os.path.basename(p) for p in paths],
        "weights": [[float(plan["weights"][i, j]) for i, c in enumerate(columns) if c[0] == p] for p in paths],
        "sigma_rels": [[gamma_to_sigma_rel(c[3]) for c in columns if c[0] == p] for p in paths],
        "fit_error": float(plan["fit_errors"][j]),
        "template": os.path.abspath(template_path),
        "kept_from_template": sorted(n for n in old_ema if n not in ema_state),
    }
    return out


def default_template(exp_dir, step):
    """The training checkpoint at ``step`` when it exists, else the latest one."""
    checkpoints = list_step_files(os.path.join(exp_dir, "checkpoints"))
    if not checkpoints:
        raise PosthocEMAError(f"no checkpoints in {os.path.join(exp_dir, 'checkpoints')}; pass --template CKPT "
                              "(any checkpoint of this run: its args and buffers are kept)")
    return dict(checkpoints).get(step, checkpoints[-1][1])


def parse_sigma_rels(text):
    """'0.05,0.10' (or a list of such strings, as --sigma-rel takes them) -> (0.05, 0.1); ValueError
    with the reason otherwise (train.py's --posthoc-ema-sigma-rels and --sigma-rel here share it)."""
    text = text if isinstance(text, str) else ",".join(map(str, text))
    values = tuple(float(part) for part in text.split(",") if part.strip())
    for value in values:
        if not 0.0 < value <= MAX_SIGMA_REL:
            raise ValueError(f"{value} is outside (0, {MAX_SIGMA_REL:.4f}]")
    if len(set(values)) != len(values):
        raise ValueError("the values must be distinct")
    return values


def output_path(pattern, exp_dir, step, sigma_rel):
    """``--out`` with its placeholders filled in."""
    try:
        return pattern.format(exp_dir=exp_dir, step=step, sigma_rel=sigma_rel)
    except (KeyError, IndexError, ValueError) as exc:
        raise PosthocEMAError(f"--out {pattern}: cannot fill in {exc!s}; the placeholders are {{sigma_rel}}, "
                              "{step} and {exp_dir}") from None


def main(argv=None):
    args = parse_args(argv)
    try:
        sigma_rels = parse_sigma_rels(args.sigma_rel)
    except ValueError as exc:
        raise PosthocEMAError(f"--sigma-rel {' '.join(args.sigma_rel)}: {exc}") from None
    if not sigma_rels:
        raise PosthocEMAError("--sigma-rel needs at least one value, e.g. --sigma-rel 0.07")
    if len({output_path(args.out, args.exp_dir, 0, s) for s in sigma_rels}) < len(sigma_rels):
        raise PosthocEMAError(f"--out {args.out} gives one file for {len(sigma_rels)} --sigma-rel values; put "
                              "{sigma_rel} in it, e.g. --out phema-{sigma_rel}.pt")
    snapshot_dir = args.snapshot_dir or os.path.join(args.exp_dir, SNAPSHOT_DIR)
    snapshots = list_step_files(snapshot_dir)
    if not snapshots:
        raise PosthocEMAError(f"no post-hoc EMA snapshots (<step:07d>.pt) in {snapshot_dir}; train with "
                              "--posthoc-ema-sigma-rels 0.05,0.10 --posthoc-ema-every N")
    states, plan = reconstruct([p for _, p in snapshots], sigma_rels, args.step, return_plan=True)
    template_path = args.template or default_template(args.exp_dir, plan["target_step"])
    try:
        template = load_checkpoint_file(template_path)
    except CheckpointError as exc:
        raise PosthocEMAError(f"--template: {exc}") from None
    files = sorted({c[0] for c in plan["columns"]})
    print(f"{len(files)} snapshots up to step {plan['target_step']} ({len(plan['columns'])} profiles); "
          f"template {template_path}")
    for j, (sigma_rel, state) in enumerate(zip(sigma_rels, states)):
        out_path = output_path(args.out, args.exp_dir, plan["target_step"], sigma_rel)
        atomic_save(build_output_checkpoint(template, template_path, state, sigma_rel, plan, j), out_path)
        print(f"sigma_rel {sigma_rel} (gamma {sigma_rel_to_gamma(sigma_rel):.3f}): profile fit error "
              f"{plan['fit_errors'][j]:.2e} -> {out_path}")
        if plan["fit_errors"][j] > FIT_WARNING:
            print(f"warning: sigma_rel {sigma_rel} is reconstructed with a {plan['fit_errors'][j]:.1%} profile error; "
                  "lengths far from the tracked ones need denser snapshots (--posthoc-ema-every)")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Reconstruct the power-function EMA of any length from the "
                                                 "post-hoc EMA snapshots of a training run (EDM2).")
    parser.add_argument("--exp-dir", required=True, help="the run's folder (<output-dir>/<exp-name>)")
    parser.add_argument("--sigma-rel", nargs="+", required=True,
                        help="relative EMA length(s) in (0, 0.2887]: 0.07, or 0.05,0.07,0.10 / 0.05 0.07 0.10")
    parser.add_argument("--step", type=int, default=None, help="snapshot step to reconstruct (default: the latest)")
    parser.add_argument("--template", default=None,
                        help="training checkpoint whose args and buffers are kept (default: "
                             "<exp>/checkpoints/<step>.pt, else the latest there)")
    parser.add_argument("--out", default=DEFAULT_OUT,
                        help="output .pt; {sigma_rel}, {step}, {exp_dir} are filled in (default: %(default)s)")
    parser.add_argument("--snapshot-dir", default=None, help="snapshot folder (default: <exp>/posthoc-ema)")
    args = parser.parse_args(argv)
    check_ranges(parser, args, {"step": AT_LEAST_0})
    return args


def cli(argv=None):
    """Exit 2 with one line for what the user must fix (snapshots, template, --out, --sigma-rel)."""
    run_cli(main, argv, prefix="posthoc_ema.py: error: ", exit_code=2)


if __name__ == "__main__":
    cli()
