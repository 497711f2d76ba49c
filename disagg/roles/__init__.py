"""pyinfra packaged deploys (@deploy), one per concern, and the operations
they share (ops, transfer); the deploy files (disagg/deploys) call them."""
