"""What a run reports outside its folder: wandb (offline without a login) and TensorBoard
trackers, and the image grids of its previews."""
import json
import math
import os

from fileio import atomic_write


def tracker_config(args, config):
    """Flag values and the model config as scalars/strings (TensorBoard's hparams accepts nothing else)."""
    out = {}
    for key, value in [*vars(args).items(), *((f"config.{k}", v) for k, v in config.to_dict().items())]:
        if isinstance(value, (dict, list, tuple)):
            value = json.dumps(value)
        out[key] = "None" if value is None else value
    return out

def wandb_has_credentials(environ=None, netrc_path=None):
    """True when wandb could log in without asking: an API key in the environment or ~/.netrc."""
    environ = os.environ if environ is None else environ
    if environ.get("WANDB_API_KEY"):
        return True
    netrc_path = netrc_path or os.path.join(os.path.expanduser("~"), ".netrc")
    try:
        with open(netrc_path) as f:
            return "api.wandb.ai" in f.read()
    except OSError:
        return False


def ensure_wandb_cannot_hang(environ=None, netrc_path=None):
    """Without WANDB_MODE and without credentials, switch wandb to offline mode (it would prompt
    for a login otherwise). Returns the message to print, or None when nothing was changed."""
    environ = os.environ if environ is None else environ
    if environ.get("WANDB_MODE") or wandb_has_credentials(environ, netrc_path):
        return None
    environ["WANDB_MODE"] = "offline"
    return ("wandb: no API key (WANDB_API_KEY or `wandb login`) and WANDB_MODE unset: logging offline; "
            "upload later with `wandb sync`")


def log_image(accelerator, name, grid, step):
    """Send an (H, W, 3) uint8 numpy grid to whichever trackers are active."""
    for tracker in accelerator.trackers:
        if tracker.name == "wandb":
            import wandb
            tracker.log({name: wandb.Image(grid)}, step=step)
        elif tracker.name == "tensorboard":
            tracker.writer.add_image(name, grid, step, dataformats="HWC")


def image_grid(images):
    """(B, H, W, 3) uint8 tensor -> (rows*H, cols*W, 3) uint8 numpy grid, near-square."""
    import torchvision
    nrow = max(1, round(math.sqrt(images.shape[0])))
    grid = torchvision.utils.make_grid(images.permute(0, 3, 1, 2).cpu(), nrow=nrow, padding=2, pad_value=0)
    return grid.permute(1, 2, 0).contiguous().numpy()


def save_png(array, path):
    from PIL import Image
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_write(path, lambda f: Image.fromarray(array).save(f, format="PNG"), fsync=False)
