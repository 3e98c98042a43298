"""Count the primes below `limit` and sum them: about a second of pure-Python
work at limit=30_000_000, so the second run shows what a cache hit saves."""


def main(limit: int = 30_000_000) -> dict:
    sieve = bytearray([1]) * limit
    sieve[0:2] = b"\x00\x00"
    for n in range(2, int(limit**0.5) + 1):
        if sieve[n]:
            sieve[n * n :: n] = bytes(len(range(n * n, limit, n)))
    primes = [i for i, flag in enumerate(sieve) if flag]
    return {"limit": limit, "count": len(primes), "sum": sum(primes), "largest": primes[-1]}
