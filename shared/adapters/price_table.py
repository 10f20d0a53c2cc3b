"""The dated price table the estimate falls back on when the Azure Retail Prices API cannot be reached and no
answer of it is cached (`shared.adapters.retail_prices`).

What each row is: the Linux pay-as-you-go price (`retailPrice`, USD per hour, `type` Consumption, neither Spot
nor Low Priority nor Windows) of one VM size in East US, i.e. what `RetailPrices` selects from the API's answer
for `armRegionName eq 'eastus'`. Azure ML's managed compute and managed online endpoints bill the VM's price.

Where the numbers come from: the list prices Microsoft publishes for these sizes (the Azure Linux VM pricing
page, and the same figures in the Retail Prices API's answers, as public code quotes them: e.g. 3.673 for
Standard_NC24ads_A100_v4, 13.96 for Standard_NC80adis_H100_v5 in eastus). They were NOT re-read from the API
by this repository's machine, which cannot reach it: refresh them (and `AS_OF`) from a machine that can, e.g.
`RetailPricesApi().query(sku, "eastus")` for each size. Prices differ by region (typically within +-25 %);
another region gets the East US price with a note saying so.

Sizes: the fine-tune and inference lists of the registry's chat models (Phi-4: NC A100 v4, ND A100 v4,
NC H100 v5, ND H100 v5) and the T4 sizes smaller models list.
"""

from __future__ import annotations

from collections.abc import Mapping

AS_OF = "2025-06-01"
"""When these prices were last taken from Microsoft's published list prices."""
REGION = "eastus"

USD_PER_HOUR: Mapping[str, float] = {
    "Standard_NC24ads_A100_v4": 3.673,
    "Standard_NC48ads_A100_v4": 7.346,
    "Standard_NC96ads_A100_v4": 14.692,
    "Standard_ND96asr_v4": 27.197,
    "Standard_ND96amsr_A100_v4": 32.77,
    "Standard_NC40ads_H100_v5": 6.98,
    "Standard_NC80adis_H100_v5": 13.96,
    "Standard_ND96isr_H100_v5": 98.32,
    "Standard_NC4as_T4_v3": 0.526,
    "Standard_NC8as_T4_v3": 0.752,
    "Standard_NC16as_T4_v3": 1.204,
    "Standard_NC64as_T4_v3": 4.352,
}
"""East US, Linux, pay-as-you-go, USD per hour, as of `AS_OF`."""
