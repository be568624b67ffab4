"""fedfin: privacy-preserving federated transfer learning for credit risk.

The code lives in the layout's folders (`common/`, `server/`, `client/`, `simulations/`);
this package installs them as `fedfin.common`, `fedfin.server`, `fedfin.client` and
`fedfin.simulations`, so no top-level module of a common name lands in a bank's
environment.
"""
