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


def _number(value: object, kind: type, name: str) -> object:
    """A --model_args string as ``kind`` (int or float); anything else as given, for the routing check."""
    if not isinstance(value, str):
        return value
    try:
        return kind(value)
    except ValueError:
        raise ValueError(f"{name} must be a number, got {value!r}") from None


@register_model("genknowsub")
class GenKnowSubLM(HFLM):
    """``HFLM`` whose model is patched with :func:`genknowsub_fast.patch_model` after loading."""

    def __init__(
        self,
        pretrained,
        library: str | None = None,
        top_k: int | str | None = None,
        temperature: float | str | None = None,
        mixing: str | None = None,
        backend: str = "auto",
        **kwargs,
    ) -> None:
        import genknowsub_fast as gkf

        # Checked before the model is loaded.
        if library is None:
            raise ValueError("model 'genknowsub' needs library=FILE in --model_args (a genknowsub-fast library)")
        lib = gkf.LoraLibrary.load(str(library))
        # --model_args values arrive as strings; the library's routing_options checks the numbers.
        routing = lib.routing_options(_number(top_k, int, "top_k"), _number(temperature, float, "temperature"), mixing)
        super().__init__(pretrained=pretrained, **kwargs)
        gkf.patch_model(self.model, lib, routing.top_k, routing.temperature, routing.mixing, backend=backend)
        self.library_path, self.top_k, self.temperature = str(library), routing.top_k, routing.temperature

    def get_model_info(self) -> dict:
        """lm-eval's model info plus the library and the routing settings (written into the results)."""
        info = super().get_model_info()
        info.update(
            genknowsub_library=self.library_path, genknowsub_top_k=self.top_k, genknowsub_temperature=self.temperature
        )
        return info
