"""disagg: disaggregated LLM serving as infrastructure-as-code."""
