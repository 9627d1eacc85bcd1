"""Privacy audits: gradient inversion and membership inference against fedsec's protections."""
