from model.selftest.run import main

main()
