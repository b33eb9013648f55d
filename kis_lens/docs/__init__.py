"""The documents kis_lens writes from results files: verdicts on the paper's claims and their Markdown."""
