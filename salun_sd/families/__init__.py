"""Text-to-image model families (SD-1.x/2.x and SDXL UNets, SD3 and FLUX.1 flow transformers): loading, denoisers, data, export."""
