"""The `energy-to-carbon` transform: grams of CO2-equivalent from energy."""
