// Test helper: runs PixelMed's DicomSRValidator and DicomInstanceValidator on many files in one JVM.
// Each validator is built once (building one compiles its XSLT, which is most of the run time on
// a small machine) and reused for every file. Output: for each file and validator, a line
// "@@@ <validator> <path>" followed by the validator's report; "@@@ END" closes the run.
// Usage: java -cp pixelmed.jar PixelMedBatch.java sr|instance|both FILE...

import com.pixelmed.dicom.AttributeList;
import com.pixelmed.dicom.TagFromName;
import com.pixelmed.validate.DicomInstanceValidator;
import com.pixelmed.validate.DicomSRValidator;

public class PixelMedBatch {
    public static void main(String[] args) throws Exception {
        String which = args[0];
        boolean sr = which.equals("sr") || which.equals("both");
        boolean instance = which.equals("instance") || which.equals("both");
        DicomSRValidator srValidator = sr ? new DicomSRValidator() : null;
        DicomInstanceValidator instanceValidator = instance ? new DicomInstanceValidator() : null;
        for (int index = 1; index < args.length; index++) {
            String path = args[index];
            if (sr) {
                System.out.println("@@@ DicomSRValidator " + path);
                try {
                    // The same options as the command line's defaults (no -describe, match case, ...).
                    System.out.print(srValidator.validate(path, false, true, false, false, false));
                } catch (Exception exception) {
                    System.out.println("Error: validator failed: " + exception);
                }
                System.out.println();
            }
            if (instance) {
                System.out.println("@@@ DicomInstanceValidator " + path);
                try {
                    AttributeList list = new AttributeList();
                    list.read(path, TagFromName.PixelData);
                    System.out.print(instanceValidator.validate(list));
                } catch (Exception exception) {
                    System.out.println("Error: validator failed: " + exception);
                }
                System.out.println();
            }
        }
        System.out.println("@@@ END");
    }
}
