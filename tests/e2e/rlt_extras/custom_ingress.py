"""A user's own ingress class, given as ingress_cls_config.ingress_cls."""

from fastapi.responses import JSONResponse

from ray.llm._internal.serve.core.ingress.ingress import OpenAiIngress


class MarkedIngress(OpenAiIngress):
    async def models(self):
        listing = await super().models()
        return JSONResponse({**listing.model_dump(), "served_by": "MarkedIngress"})
