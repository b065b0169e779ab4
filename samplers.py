"""ODE (Euler/Heun, adaptive dopri5) and SDE (Euler-Maruyama) samplers for velocity models
(docs/method.md, "Sampling"; docs/sampling.md for the flags).

Same signatures and semantics as the authors' ``samplers.py``: the state is float64, the model
sees ``latents.dtype``; classifier-free guidance runs the conditional and the null-label batch
together only while ``guidance_low <= t <= guidance_high`` and ``cfg_scale > 1``. The null
label is the model's ``num_classes`` (the authors hard-code 1000). All times are Python floats
computed once, so the step loop never waits on the device.

Autoguidance (``guide_model``): inside the same interval the null-label branch is replaced by a
second, weaker model evaluated with the true labels, v = v_guide + w (v_main - v_guide) with
w = ``cfg_scale``; outside it, or with w = 1, the main model runs alone.

``dopri5_sampler`` integrates the ODE with torchdiffeq's adaptive Dormand-Prince solver, one
solve per sample (its own steps and error control, so the batch a sample is in does not steer
its steps), while the model still sees the whole batch at each evaluation.
"""
import threading

import torch

from errors import UserError
from loss import interpolant


def unwrap_model(model):
    """The SiT under DDP / torch.compile wrappers."""
    while True:
        inner = getattr(model, "module", None)
        if inner is None:
            inner = getattr(model, "_orig_mod", None)
        if inner is None:
            return model
        model = inner


def null_label_of(model):
    num_classes = getattr(unwrap_model(model), "num_classes", None)
    if num_classes is None:
        raise ValueError("classifier-free guidance needs the model's num_classes (its null label); pass null_label=")
    return num_classes


def score_from_velocity(v, x, t, path_type="linear"):
    """Score of x_t from the velocity: for the linear path s = ((t - 1) v - x) / t."""
    alpha_t, sigma_t, d_alpha_t, d_sigma_t = interpolant(torch.as_tensor(t, dtype=torch.float64), path_type)
    ratio = alpha_t / d_alpha_t
    var = sigma_t ** 2 - ratio * d_sigma_t * sigma_t
    return (ratio * v - x) / var


class _GuidedVelocity:
    """Evaluates the model (with CFG where asked), always returning float64 on x's shape."""

    def __init__(self, model, y, cfg_scale, guidance_low, guidance_high, dtype, null_label, guide_model=None):
        self.model = model
        self.y = y
        self.cfg_scale = cfg_scale
        self.low, self.high = guidance_low, guidance_high
        self.dtype = dtype
        self.guide_model = guide_model  # autoguidance: this model replaces the null-label branch
        if cfg_scale > 1.0 and guide_model is None:
            self.null = null_label_of(model) if null_label is None else null_label
            self.y_both = torch.cat([y, torch.full_like(y, self.null)])

    def guided(self, t):
        return self.cfg_scale > 1.0 and self.low <= t <= self.high

    def __call__(self, x, t, guide, transform=None):
        """Model output at (x, t); ``transform(v, x, t)`` (e.g. SDE drift) is applied before CFG
        (or before the autoguidance combination, to the main and the guide's output alike)."""
        if guide and self.guide_model is not None:
            strong = self._evaluate(self.model, x, t, self.y, transform)
            weak = self._evaluate(self.guide_model, x, t, self.y, transform)
            return weak + self.cfg_scale * (strong - weak)
        inp, labels = (torch.cat([x, x]), self.y_both) if guide else (x, self.y)
        t_vec = torch.full((inp.shape[0],), t, device=inp.device, dtype=self.dtype)
        out = self.model(inp.to(self.dtype), t_vec, y=labels)[0].to(torch.float64)
        if transform is not None:
            out = transform(out, inp, t)
        if not guide:
            return out
        cond, uncond = out.chunk(2)
        return uncond + self.cfg_scale * (cond - uncond)

    def _evaluate(self, model, x, t, labels, transform=None):
        """``model`` at (x, t) with ``labels``, float64; ``t`` a float or a (B,) tensor of times."""
        t_vec = t if torch.is_tensor(t) else torch.full((x.shape[0],), t, device=x.device, dtype=self.dtype)
        out = model(x.to(self.dtype), t_vec, y=labels)[0].to(torch.float64)
        return out if transform is None else transform(out, x, t)

    def rows(self, x, times, y):
        """The (guided) velocity of rows that each sit at their own time ``times[i]`` (floats):
        rows inside the guidance interval get CFG or autoguidance, the others the model alone.
        One forward pass of the main model over all rows plus the guided rows' null-label
        copies (CFG), or one of each model (autoguidance). Which other rows share the batch
        changes a row's output only as far as the model's own rounding across batch shapes does
        (none for a row-wise model; the tests check it bit for bit)."""
        t_vec = torch.tensor(times, dtype=self.dtype, device=x.device)
        picked = [i for i, t in enumerate(times) if self.guided(t)]
        if not picked:
            return self._evaluate(self.model, x, t_vec, y)
        g = torch.tensor(picked, device=x.device)
        if self.guide_model is not None:
            out = self._evaluate(self.model, x, t_vec, y)
            weak = self._evaluate(self.guide_model, x[g], t_vec[g], y[g])
            out[g] = weak + self.cfg_scale * (out[g] - weak)
            return out
        both = self._evaluate(self.model, torch.cat([x, x[g]]), torch.cat([t_vec, t_vec[g]]),
                              torch.cat([y, torch.full_like(y[g], self.null)]))
        out, uncond = both[: x.shape[0]], both[x.shape[0]:]
        out[g] = uncond + self.cfg_scale * (out[g] - uncond)
        return out


def euler_sampler(model, latents, y, num_steps=20, heun=False, cfg_scale=1.0, guidance_low=0.0,
                  guidance_high=1.0, path_type="linear", null_label=None, guide_model=None):
    """Probability-flow ODE from t=1 to 0 on ``num_steps`` uniform steps; Heun's correction on
    all but the last step. ``path_type`` is unused (velocity models), kept for the signature.
    ``guide_model``: autoguidance instead of CFG (module docstring). Model evaluations per
    sample: ``num_steps`` (Euler) or ``2 num_steps - 1`` (Heun), each one forward pass, two
    while guided."""
    velocity = _GuidedVelocity(model, y, cfg_scale, guidance_low, guidance_high, latents.dtype, null_label,
                               guide_model)
    t_steps = torch.linspace(1, 0, num_steps + 1, dtype=torch.float64).tolist()
    x = latents.to(torch.float64)
    with torch.no_grad():
        for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
            guide = velocity.guided(t_cur)
            d_cur = velocity(x, t_cur, guide)
            x_next = x + (t_next - t_cur) * d_cur
            if heun and i < num_steps - 1:
                d_prime = velocity(x_next, t_next, guide)
                x_next = x + (t_next - t_cur) * (0.5 * d_cur + 0.5 * d_prime)
            x = x_next
    return x


def euler_maruyama_sampler(model, latents, y, num_steps=20, heun=False, cfg_scale=1.0, guidance_low=0.0,
                           guidance_high=1.0, path_type="linear", null_label=None, noise=None, guide_model=None):
    """Reverse SDE with diffusion w(t) = 2t by Euler-Maruyama on ``num_steps`` points from t=1 to
    0.04, then one drift-only step to 0. ``heun`` is unused (kept for the signature).

    ``noise``: per-step Gaussian noise, a tensor indexed by step (``num_steps - 1`` steps of
    ``latents``' shape) or a callable ``step -> tensor``; default ``torch.randn_like``.
    Passing it makes each sample's trajectory independent of batch composition.
    ``guide_model``: autoguidance; the main and the guide's drifts are combined as CFG combines
    the conditional and unconditional drifts.
    """
    velocity = _GuidedVelocity(model, y, cfg_scale, guidance_low, guidance_high, latents.dtype, null_label,
                               guide_model)
    t_steps = torch.linspace(1.0, 0.04, num_steps, dtype=torch.float64).tolist() + [0.0]
    x = latents.to(torch.float64)

    def drift(v, x_in, t):
        return v - t * score_from_velocity(v, x_in, t, path_type)  # v - 0.5 w(t) s with w = 2t

    with torch.no_grad():
        for i, (t_cur, t_next) in enumerate(zip(t_steps[:-2], t_steps[1:-1])):
            dt = t_next - t_cur
            if noise is None:
                eps = torch.randn_like(x)
            else:
                eps = (noise(i) if callable(noise) else noise[i]).to(x)
            d_cur = velocity(x, t_cur, velocity.guided(t_cur), transform=drift)
            x = x + d_cur * dt + (2 * t_cur) ** 0.5 * abs(dt) ** 0.5 * eps
        t_cur, t_next = t_steps[-2], t_steps[-1]
        d_cur = velocity(x, t_cur, velocity.guided(t_cur), transform=drift)
        x = x + (t_next - t_cur) * d_cur
    return x


DOPRI5_ATOL, DOPRI5_RTOL = 1e-6, 1e-3  # SiT's ODE sampling defaults
DOPRI5_MAX_STEPS = 10_000                # accepted + rejected steps per sample before giving up


class Dopri5Failed(UserError, RuntimeError):
    """torchdiffeq gave up on a sample (step size underflow, too many steps): one line naming the flags."""


class _Lockstep:
    """Gathers the velocity requests of ``n`` solver threads into one batch per evaluation.

    Each thread runs its own adaptive solve and calls ``request(i, t, x)`` whenever it needs the
    velocity; ``serve`` (on the caller's thread, where the model lives) waits until every
    unfinished thread has asked, evaluates them together and hands each its row. The rows are
    sorted by sample, so a batch depends only on which samples are still being solved."""

    def __init__(self, n):
        self.cond = threading.Condition()
        self.active = n
        self.waiting, self.done = {}, {}
        self.error = None

    def request(self, i, t, x):
        with self.cond:
            if self.error is None:
                self.waiting[i] = (t, x)
                self.cond.notify_all()
                self.cond.wait_for(lambda: i in self.done or self.error is not None)
            if i not in self.done:  # unwinds this thread; the first error is what the caller sees
                raise Dopri5Failed("stopped: another sample or the model failed")
            return self.done.pop(i)

    def finish(self, error=None):
        """A thread is done (``error``: why it stopped early; only the first one is kept)."""
        with self.cond:
            self.active -= 1
            if error is not None and self.error is None:
                self.error = error
            self.cond.notify_all()

    def serve(self, evaluate):
        """Run ``evaluate(sorted [(i, (t, x))]) -> rows`` until every thread has finished."""
        while True:
            with self.cond:
                self.cond.wait_for(lambda: self.error is not None or self.active == 0
                                   or (self.waiting and len(self.waiting) == self.active))
                if self.error is not None or self.active == 0:
                    return
                batch = sorted(self.waiting.items())
                self.waiting.clear()
            try:
                rows = evaluate(batch)
            except BaseException as exc:
                with self.cond:
                    self.error = exc
                    self.cond.notify_all()
                return
            with self.cond:
                self.done.update(zip([i for i, _ in batch], rows))
                self.cond.notify_all()


def dopri5_sampler(model, latents, y, cfg_scale=1.0, guidance_low=0.0, guidance_high=1.0, path_type="linear",
                   null_label=None, guide_model=None, atol=DOPRI5_ATOL, rtol=DOPRI5_RTOL, max_steps=DOPRI5_MAX_STEPS):
    """Probability-flow ODE from t=1 to 0 with torchdiffeq's dopri5 (Dormand-Prince 5(4), error
    per sample in the RMS norm of ``atol + rtol |x|``-scaled errors). Returns ``(x, nfe, guided)``:
    the float64 samples and, per sample, the number of velocity evaluations and how many of them
    were guided (each guided evaluation is two forward passes: conditional + null label, or main
    + guide). ``path_type`` is unused, as in ``euler_sampler``.

    Every sample is solved on its own (its own step sizes), so its result depends on the batch
    only through the model's own rounding across batch shapes, as with the fixed-step samplers;
    the solver state lives on the CPU in float64 and the model sees the batch of all
    samples still being solved, each at its own time. Guidance follows the interval rule at
    each evaluation's time; its ends inside (0, 1) are passed to the solver as discontinuities,
    so no step straddles one (one extra evaluation per end), and the last step ends at t = 0
    exactly (the model is never evaluated outside [0, 1])."""
    from torchdiffeq import odeint  # only dopri5 needs it

    velocity = _GuidedVelocity(model, y, cfg_scale, guidance_low, guidance_high, latents.dtype, null_label,
                               guide_model)
    device, n = latents.device, latents.shape[0]
    start = latents.detach().to("cpu", torch.float64)
    times = torch.tensor([1.0, 0.0], dtype=torch.float64)
    options = {"step_t": torch.tensor([0.0], dtype=torch.float64), "max_num_steps": max_steps}
    jumps = sorted({t for t in (guidance_low, guidance_high) if 0.0 < t < 1.0}) if cfg_scale > 1.0 else []
    if jumps:
        options["jump_t"] = torch.tensor(jumps, dtype=torch.float64)
    hub = _Lockstep(n)
    results, nfe, guided = [None] * n, [0] * n, [0] * n

    def solve(i):
        def f(t, x):
            t = float(t)
            nfe[i] += 1
            guided[i] += velocity.guided(t)
            return hub.request(i, t, x)

        error = None
        try:
            with torch.no_grad():
                results[i] = odeint(f, start[i], times, rtol=rtol, atol=atol, method="dopri5", options=options)[-1]
        except AssertionError as exc:
            gave_up = "underflow in dt" in str(exc) or "max_num_steps" in str(exc)  # torchdiffeq's way of saying so
            error = Dopri5Failed(f"dopri5 gave up on a sample ({exc}); loosen --rtol {rtol} / --atol {atol}") \
                if gave_up else exc
        except BaseException as exc:
            error = exc
        finally:
            hub.finish(error)

    def evaluate(batch):
        rows = [i for i, _ in batch]
        x = torch.stack([state for _, (_, state) in batch]).to(device)
        out = velocity.rows(x, [t for _, (t, _) in batch], y[torch.tensor(rows, device=y.device)])
        return out.to("cpu", torch.float64).unbind(0)

    threads = [threading.Thread(target=solve, args=(i,), daemon=True, name=f"dopri5-{i}") for i in range(n)]
    for thread in threads:
        thread.start()
    try:
        with torch.no_grad():
            hub.serve(evaluate)
    finally:
        with hub.cond:  # an interrupt here: release the threads before joining them
            if hub.active and hub.error is None:
                hub.error = Dopri5Failed("interrupted")
            hub.cond.notify_all()
        for thread in threads:
            thread.join()
    if hub.error is not None:
        raise hub.error
    x = torch.stack(results).to(device)
    return x, torch.tensor(nfe), torch.tensor(guided)
