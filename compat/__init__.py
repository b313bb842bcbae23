"""mmdit-compat: the executable compatibility matrix between the stable and the cycle trainer."""
