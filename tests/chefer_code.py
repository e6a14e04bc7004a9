"""Loads Chefer et al.'s published LRP code (hila-chefer/Transformer-Explainability) from a checkout
or a bare git directory outside this repository, for the live comparison in tests/test_lrp.py and for
tests/fixtures/make_chefer_reference.py, which stores its maps. Nothing of that code is copied here.
"""

import importlib
import os
import subprocess
import sys
import types
from pathlib import Path

FILES = ["modules/__init__.py", "modules/layers_ours.py", "modules/layers_lrp.py",
         "baselines/ViT/ViT_LRP.py", "baselines/ViT/ViT_orig_LRP.py", "baselines/ViT/helpers.py",
         "baselines/ViT/weight_init.py", "baselines/ViT/layer_helpers.py",
         "baselines/ViT/ViT_explanation_generator.py"]
_MIRROR_NAME = Path(".mirror") / "hila-chefer+Transformer-Explainability" / "repo"


def default_repo() -> Path:
    """CHEFER_REPO, else a mirror beside the checkout (a developer's workplace), else the workplace's
    fixed mirror folder (CI clones the project elsewhere): the first that exists."""
    if os.environ.get("CHEFER_REPO"):
        return Path(os.environ["CHEFER_REPO"])
    beside = Path(__file__).resolve().parents[2] / _MIRROR_NAME
    return next((p for p in (beside, Path("/work") / _MIRROR_NAME) if p.exists()), beside)


def _git(repo: Path, *args: str) -> bytes:
    # A checkout has the files in its work tree; a bare mirror only in git.
    git_dir = repo / ".git" if (repo / ".git").exists() else repo
    return subprocess.run(["git", "--git-dir", str(git_dir), *args], check=True, capture_output=True).stdout


def read_file(repo: Path, rel: str) -> bytes:
    if (repo / rel).is_file():
        return (repo / rel).read_bytes()
    return _git(repo, "show", f"HEAD:{rel}")


def commit(repo: Path) -> str:
    """The upstream commit the code comes from ('unknown' for a plain copy without git)."""
    try:
        return _git(repo, "rev-parse", "HEAD").decode().strip()
    except (subprocess.CalledProcessError, OSError):
        return "unknown"


def _einops_stand_in(torch):
    """`einops.rearrange` for the four patterns Chefer's ViT uses (einops is not a dependency)."""

    def rearrange(x, pattern, **kw):
        if pattern == "b n (qkv h d) -> qkv b h n d":
            return x.reshape(x.shape[0], x.shape[1], kw["qkv"], kw["h"], -1).permute(2, 0, 3, 1, 4)
        if pattern == "b h n d -> b n (h d)":
            b, h, n, d = x.shape
            return x.permute(0, 2, 1, 3).reshape(b, n, h * d)
        if pattern == "b n (h d) -> b h n d":
            return x.reshape(x.shape[0], x.shape[1], kw["h"], -1).permute(0, 2, 1, 3)
        if pattern == "qkv b h n d -> b n (qkv h d)":
            x = torch.stack(list(x))
            q, b, h, n, d = x.shape
            return x.permute(1, 3, 0, 2, 4).reshape(b, n, q * h * d)
        raise NotImplementedError(pattern)

    module = types.ModuleType("einops")
    module.rearrange = rearrange
    return module


def load(repo: Path, dest: Path) -> dict:
    """Chefer's ViT_LRP, ViT_orig_LRP and ViT_explanation_generator modules, by their last name.
    Their files are written to `dest` (a temporary folder) and imported from there; raises
    OSError / CalledProcessError when `repo` cannot be read."""
    import torch

    for rel in FILES:
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        (dest / rel).write_bytes(read_file(repo, rel))
    for pkg in ("baselines", "baselines/ViT"):
        (dest / pkg / "__init__.py").touch()
    names = ["baselines.ViT.ViT_LRP", "baselines.ViT.ViT_orig_LRP", "baselines.ViT.ViT_explanation_generator"]
    ours = ("modules", "baselines", "einops")
    saved = {k: sys.modules.pop(k) for k in list(sys.modules) if k.split(".")[0] in ours}
    try:
        importlib.import_module("einops")
    except ImportError:
        sys.modules["einops"] = _einops_stand_in(torch)
    sys.path.insert(0, str(dest))
    try:
        return {n.rsplit(".", 1)[1]: importlib.import_module(n) for n in names}
    finally:
        sys.path.remove(str(dest))
        for k in [k for k in sys.modules if k.split(".")[0] in ours]:
            del sys.modules[k]
        sys.modules.update(saved)


def build_model(module, state_dict, *, img_size, patch_size, embed_dim, depth, num_heads, num_classes, dtype):
    """Chefer's VisionTransformer holding a timm state dict (timm's names are Chefer's names)."""
    m = module.VisionTransformer(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
                                 num_heads=num_heads, mlp_ratio=4, qkv_bias=True, num_classes=num_classes)
    m.load_state_dict(state_dict, strict=True)
    m.norm.eps = 1e-6  # Chefer builds the final norm with torch's default 1e-5; timm (and we) use 1e-6
    return m.to(dtype).eval()


def maps(mods, model, image, cls, method, **kw):
    """One image (1, 3, H, W), one class (None: the predicted one), through Chefer's
    `LRP.generate_LRP`, as a flat float64 numpy array. Its `.cuda()` calls are made no-ops."""
    import torch

    cuda = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *a, **k: self
    try:
        out = mods["ViT_explanation_generator"].LRP(model).generate_LRP(image, index=cls, method=method, **kw)
    finally:
        torch.Tensor.cuda = cuda
    return out.detach().double().numpy().reshape(-1)
