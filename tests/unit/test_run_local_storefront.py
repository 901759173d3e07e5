"""make run's storefront (scripts/run_local.Storefront): a replayed item that was among the items
shown to the user is a click carrying that answer's recommendation_id; an answer is used once."""
from __future__ import annotations

from deltarec.v1 import common_pb2, ranker_pb2
from scripts.run_local import Storefront


class FakeRanker:
    def __init__(self, variant: str) -> None:
        self.variant, self.asked = variant, []

    def Recommend(self, request, timeout=None):
        self.asked.append(request.user_id)
        return ranker_pb2.RecommendResponse(
            items=[ranker_pb2.ScoredItem(item_id=f"{request.user_id}-item-{n}") for n in range(3)],
            variant=ranker_pb2.Variant(name=self.variant, model_version=1),
            recommendation_id=f"rid-{request.user_id}-{len(self.asked)}")


def test_a_shown_item_bought_next_is_a_click_on_that_answer():
    current, canary = FakeRanker("current"), FakeRanker("canary")
    storefront = Storefront([current, canary], threads=2)
    try:
        storefront.show(["u1", "u2", "u1"])                 # u1 twice in a batch: one answer
        assert sorted(current.asked + canary.asked) == ["u1", "u2"] and storefront.answers == 2
        assert storefront.by_variant == {"current": 1, "canary": 1}
        click = storefront.click("u1", "u1-item-2", "e-1-click")
        assert click is not None and click.type == common_pb2.EVENT_TYPE_CLICK and click.item_id == "u1-item-2"
        assert click.recommendation_id.startswith("rid-u1-") and click.event_id == "e-1-click"
        assert storefront.click("u1", "u1-item-1", "e-2-click") is None       # the answer was used up
        assert storefront.click("u2", "not-shown", "e-3-click") is None and storefront.clicks == 1
        storefront.show(["u1"])                                              # a new answer for u1
        assert len(current.asked + canary.asked) == 3
    finally:
        storefront.close()
