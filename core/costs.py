"""What the seller's decisions cost: the one configuration section scoring needs as well.

Training reads it from the training configuration (``costs:``) and stores it with the model;
the risk thresholds and the explanations' decisions are priced with it wherever a model scores.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator


class CostsConfig(BaseModel):
    """What a buyer cancellation and the two interventions cost, in one currency-neutral unit.

    Use the unit of the shop's accounts (roubles, yuan): only ratios matter. ``*_effect`` is the
    share of would-be buyer cancellations that the intervention prevents.

    - ``cancelled_order_cost``: shipping there and back, packaging and handling of an order the
      buyer cancels before delivery.
    - ``contact_cost`` / ``contact_effect``: messaging or calling the buyer to confirm (medium).
    - ``hold_cost`` / ``hold_effect``: holding the order and confirming with the buyer before
      handing it over (high): slower delivery and warehouse time, but most effective.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    cancelled_order_cost: float = Field(400.0, gt=0)
    contact_cost: float = Field(10.0, ge=0)
    contact_effect: float = Field(0.25, gt=0, le=1)
    hold_cost: float = Field(40.0, ge=0)
    hold_effect: float = Field(0.5, gt=0, le=1)

    @model_validator(mode="after")
    def _hold_is_the_stronger_intervention(self) -> CostsConfig:
        # Otherwise one intervention dominates the other and the three levels collapse to two.
        if self.hold_effect <= self.contact_effect:
            raise ValueError("hold_effect must be larger than contact_effect")
        if self.hold_cost < self.contact_cost:
            raise ValueError("hold_cost must not be smaller than contact_cost")
        return self
