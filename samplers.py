"""ODE (Euler/Heun) and SDE (Euler-Maruyama) samplers for velocity models (docs/method.md, "Sampling").

Same signatures and semantics as the authors' ``samplers.py``: the state is float64, the model
sees ``latents.dtype``; classifier-free guidance runs the conditional and the null-label batch
together only while ``guidance_low <= t <= guidance_high`` and ``cfg_scale > 1``. The null
label is the model's ``num_classes`` (the authors hard-code 1000). All times are Python floats
computed once, so the step loop never waits on the device.
"""
import torch

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

    def __init__(self, model, y, cfg_scale, guidance_low, guidance_high, dtype, null_label):
        self.model = model
        self.y = y
        self.cfg_scale = cfg_scale
        self.low, self.high = guidance_low, guidance_high
        self.dtype = dtype
        if cfg_scale > 1.0:
            null = null_label_of(model) if null_label is None else null_label
            self.y_both = torch.cat([y, torch.full_like(y, null)])

    def guided(self, t):
        return self.cfg_scale > 1.0 and self.low <= t <= self.high

    def __call__(self, x, t, guide, transform=None):
        """Model output at (x, t); ``transform(v, x, t)`` (e.g. SDE drift) is applied before CFG."""
        inp, labels = (torch.cat([x, x]), self.y_both) if guide else (x, self.y)
        t_vec = torch.full((inp.shape[0],), t, device=inp.device, dtype=self.dtype)
        out = self.model(inp.to(self.dtype), t_vec, y=labels)[0].to(torch.float64)
        if transform is not None:
            out = transform(out, inp, t)
        if not guide:
            return out
        cond, uncond = out.chunk(2)
        return uncond + self.cfg_scale * (cond - uncond)


def euler_sampler(model, latents, y, num_steps=20, heun=False, cfg_scale=1.0, guidance_low=0.0,
                  guidance_high=1.0, path_type="linear", null_label=None):
    """Probability-flow ODE from t=1 to 0 on ``num_steps`` uniform steps; Heun's correction on
    all but the last step. ``path_type`` is unused (velocity models), kept for the signature."""
    velocity = _GuidedVelocity(model, y, cfg_scale, guidance_low, guidance_high, latents.dtype, null_label)
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
                           guidance_high=1.0, path_type="linear", null_label=None, noise=None):
    """Reverse SDE with diffusion w(t) = 2t by Euler-Maruyama on ``num_steps`` points from t=1 to
    0.04, then one drift-only step to 0. ``heun`` is unused (kept for the signature).

    ``noise``: per-step Gaussian noise, a tensor indexed by step (``num_steps - 1`` steps of
    ``latents``' shape) or a callable ``step -> tensor``; default ``torch.randn_like``.
    Passing it makes each sample's trajectory independent of batch composition.
    """
    velocity = _GuidedVelocity(model, y, cfg_scale, guidance_low, guidance_high, latents.dtype, null_label)
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
