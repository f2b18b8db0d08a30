"""The lm-eval model ``genknowsub``: lm-eval's Hugging Face model (``HFLM``) patched with a library.

    lm_eval --model genknowsub --model_args pretrained=DIR,library=LIB,top_k=3 --tasks ...

Every ``HFLM`` argument is accepted; the others are ``library`` (a file written by ``genknowsub-fast build``),
``top_k`` and ``temperature`` (default: the library's routing defaults, else min(3, E) and 1.0), ``mixing`` and
``backend`` (as in :func:`genknowsub_fast.patch_model`). Requests run through lm-eval's own batching; the patched
layers route every token with Arrow.

How ``lm_eval`` finds the name: the package declares it as an entry point in the ``lm_eval.models`` group, which
lm-eval's development branch reads itself (merged after 0.4.13, not yet released). lm-eval 0.4.13 reads no entry
points, so the package also installs a start-up hook (``genknowsub_fast_lm_eval.pth``; ``site_hooks/`` in the
repository) that registers the entry point when lm-eval imports ``lm_eval.models``. Importing this module registers
the name as well.
"""

from __future__ import annotations

from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM


@register_model("genknowsub")
class GenKnowSubLM(HFLM):
    """``HFLM`` whose model is patched with :func:`genknowsub_fast.patch_model` after loading."""

    def __init__(
        self,
        pretrained,
        library: str | None = None,
        top_k: int | str | None = None,
        temperature: float | str | None = None,
        mixing: str = "output",
        backend: str = "auto",
        **kwargs,
    ) -> None:
        import genknowsub_fast as gkf

        # Checked before the model is loaded.
        if library is None:
            raise ValueError("model 'genknowsub' needs library=FILE in --model_args (a genknowsub-fast library)")
        lib = gkf.LoraLibrary.load(str(library))
        k, t = lib.default_routing(top_k, temperature)
        k, t = int(k), float(t)
        if not 1 <= k <= lib.num_experts:
            raise ValueError(f"top_k={k} is outside [1, {lib.num_experts}] (the library's experts)")
        if not t > 0:
            raise ValueError(f"temperature must be > 0, got {t}")
        super().__init__(pretrained=pretrained, **kwargs)
        gkf.patch_model(self.model, lib, top_k=k, temperature=t, mixing=mixing, backend=backend)
        self.library_path, self.top_k, self.temperature = str(library), k, t

    def get_model_info(self) -> dict:
        """lm-eval's model info plus the library and the routing settings (written into the results)."""
        info = super().get_model_info()
        info.update(
            genknowsub_library=self.library_path, genknowsub_top_k=self.top_k, genknowsub_temperature=self.temperature
        )
        return info
