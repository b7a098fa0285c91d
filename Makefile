# Convenience aliases; tasks.py does the work and needs nothing but Python 3.11.
.PHONY: run test protos bench
run:
	python3 tasks.py run
test:
	python3 tasks.py test
protos:
	python3 tasks.py protos
bench:
	python3 tasks.py bench
