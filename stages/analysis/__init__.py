"""Analysis stages of CIMEO's masks and weights (the seed's Figure 2 overlaps and Figure 4
principal angles); the computations live in methods/cimeo.py."""
