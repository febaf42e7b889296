"""Studies under consortium governance (docs/governance.md, "Studies and site budgets").

manifest.py     a study as a signed manifest, identified by the SHA-256 of its content
approvals.py    signed approval records, their checks (reason codes) and the node's store
site_budget.py  the hospital's lifetime privacy budget per data set, composed across studies
gate.py         what a node checks before it runs a study (approvals, budget)
cli.py          `murmur study propose|approve|import|show|list`
"""
