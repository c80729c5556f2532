from dstd.main import main

main()
