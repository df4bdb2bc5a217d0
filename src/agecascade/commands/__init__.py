"""Commands a user runs by hand, not DVC stages (those live in ``agecascade.pipelines``)."""
